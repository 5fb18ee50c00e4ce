//! Loading, attaching and pinning the eBPF programs: the one module that touches links.
//!
//! Layout under the bpffs directory (default `/sys/fs/bpf/beamlit/`):
//! - `services`, `service_counters`, `socket_dest`, `flows`, `config`, `exempt_cgroups`: the
//!   maps (pinned by name, with BTF);
//! - `links/<program>`: one cgroup link per program.
//!
//! Start-up adopts what a previous agent left: maps are reused from their pins (contents kept)
//! and each pinned link gets the new program through BPF_LINK_UPDATE, which swaps the program of
//! a live attachment atomically. Redirection therefore never stops across restarts or upgrades,
//! and keeps working while no agent runs at all.
use std::{
    fs,
    io::{self, ErrorKind},
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, links::FdLink},
};
use aya_log::EbpfLogger;
use beamlit_common::{AgentConfig, map_names};
use tracing::{error, info, warn};

use crate::{
    maps::{MapsError, PinnedMaps},
    sys,
};

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/beamlit";
/// SO_MARK of the agent's own sockets. Chosen outside the bits kube-proxy (0x4000, 0x8000),
/// Cilium (0x0f00) and Calico (0xffff0000) use; configurable with --bypass-mark.
pub const DEFAULT_BYPASS_MARK: u32 = 0xbe;
/// Cgroup links coexist with other programs on the same cgroup (Cilium, systemd) whatever the
/// mode; the kernel rejects the legacy ALLOW_MULTI flag on link creation.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/beamlit-agent-ebpf"));

/// Programs in attach order: the ones that report come first, so that any socket `connect*`
/// redirects is already covered by `getpeername*` and `sock_ops`.
pub const PROGRAMS: [&str; 5] = [
    "getpeername4",
    "getpeername6",
    "sock_ops",
    "connect4",
    "connect6",
];
const MAPS: [&str; 6] = [
    map_names::SERVICES,
    map_names::SERVICE_COUNTERS,
    map_names::SOCKET_DEST,
    map_names::FLOWS,
    map_names::CONFIG,
    map_names::EXEMPT_CGROUPS,
];

/// Pins of earlier agent versions that this one no longer uses (relative to the bpffs
/// directory): the `sock_release` link and the cookie-keyed `sockets` map, both replaced by
/// socket-local storage. Removed once this version's programs are all in place (an upgrade
/// keeps redirecting throughout: the old link only deleted records nobody reads any more), and
/// by `cleanup`.
const RETIRED_PINS: [&str; 2] = ["links/sock_release", map_names::RETIRED_SOCKETS];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EbpfLogLevel {
    /// Nothing is formatted in the hot path.
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The `log` target of records coming from the eBPF programs (their crate name).
pub const EBPF_LOG_TARGET: &str = "beamlit_agent_ebpf";

impl EbpfLogLevel {
    pub fn as_tracing(self) -> Option<tracing::Level> {
        match self {
            Self::Off => None,
            Self::Error => Some(tracing::Level::ERROR),
            Self::Warn => Some(tracing::Level::WARN),
            Self::Info => Some(tracing::Level::INFO),
            Self::Debug => Some(tracing::Level::DEBUG),
            Self::Trace => Some(tracing::Level::TRACE),
        }
    }

    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` global (0 = off, then aya's Level order).
    fn as_global(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    pub bpffs_dir: PathBuf,
    pub cgroup: PathBuf,
    pub bypass_mark: u32,
    pub ebpf_log_level: EbpfLogLevel,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "{0} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` (in \
         Kubernetes: a hostPath volume for /sys/fs/bpf)"
    )]
    NotBpffs(PathBuf),
    // Fields named `error`, not `source`: the message carries the cause, and a chained source
    // would print it (the verifier log, say) a second time.
    #[error("cgroup {path}: {error}; pass --cgroup with a cgroup v2 directory")]
    Cgroup { path: PathBuf, error: io::Error },
    #[error(
        "this agent was built without its eBPF object (AYA_BUILD_SKIP); rebuild with `cargo \
         build -p beamlit-agent`"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(aya::EbpfError),
    #[error("program {name}: {error}")]
    Program {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error(
        "{pin} is attached to another cgroup (id {pinned}) than --cgroup {cgroup} (id {wanted}); \
         run `beamlit-agent cleanup` first to move the agent"
    )]
    OtherCgroup {
        pin: PathBuf,
        pinned: u64,
        cgroup: PathBuf,
        wanted: u64,
    },
    #[error("{context} {path}: {error}")]
    Pin {
        context: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

impl From<aya::EbpfError> for DataplaneError {
    fn from(e: aya::EbpfError) -> Self {
        Self::Load(e)
    }
}

/// How a program got into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// No pinned link existed: attached and pinned.
    Attached,
    /// A pinned link existed: its program was replaced in place.
    Replaced { old_program_id: u32 },
}

pub struct Dataplane {
    /// Keeps the loaded programs (and the log ring buffer) alive for the agent's lifetime.
    _ebpf: Ebpf,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    pub maps: PinnedMaps,
    pub attachments: Vec<(&'static str, Attachment)>,
}

impl Dataplane {
    pub fn start(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        if OBJECT.is_empty() {
            return Err(DataplaneError::NoObject);
        }
        prepare_dir(&config.bpffs_dir)?;
        let links_dir = config.bpffs_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|error| DataplaneError::Pin {
            context: "creating",
            path: links_dir.clone(),
            error,
        })?;
        let cgroup_err = |error| DataplaneError::Cgroup {
            path: config.cgroup.clone(),
            error,
        };
        let cgroup = fs::File::open(&config.cgroup).map_err(cgroup_err)?;
        // A cgroup v2 directory's inode number is its cgroup id, which links report.
        let cgroup_id = cgroup.metadata().map_err(cgroup_err)?.ino();

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&config.bpffs_dir)
            .override_global("AYA_LOG_LEVEL", &config.ebpf_log_level.as_global(), false)
            .load(OBJECT)?;
        let logger = if config.ebpf_log_level == EbpfLogLevel::Off {
            None
        } else {
            match EbpfLogger::init(&mut ebpf) {
                Ok(logger) => Some(logger),
                Err(e) => {
                    warn!(error = %e, "eBPF logs unavailable");
                    None
                }
            }
        };

        let mut maps = PinnedMaps::open(&config.bpffs_dir)?;
        // Keep the heartbeat a previous agent wrote: its tunnel may still be draining.
        let heartbeat = maps.config().map_or(0, |c| c.tunnel_heartbeat_ns);
        maps.set_config(AgentConfig {
            bypass_mark: config.bypass_mark,
            _pad: 0,
            tunnel_heartbeat_ns: heartbeat,
        })?;

        // Every program through the verifier before any link is touched: a program the kernel
        // refuses (a missing capability, an old kernel) leaves the previous agent's links, or
        // nothing, in place, never a mix of old and new.
        for name in PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        let mut attachments: Vec<(&'static str, Attachment)> = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let pin = links_dir.join(name);
            let attachment = match attach_program(&mut ebpf, name, &cgroup, cgroup_id, &pin, config)
            {
                Ok(a) => a,
                Err(e) => {
                    roll_back(&links_dir, &attachments);
                    return Err(e);
                }
            };
            match attachment {
                Attachment::Attached => info!(program = name, pin = %pin.display(), "attached"),
                Attachment::Replaced { old_program_id } => {
                    info!(
                        program = name,
                        old_program_id, "adopted pinned link, program replaced"
                    )
                }
            }
            attachments.push((name, attachment));
        }
        for retired in RETIRED_PINS {
            let pin = config.bpffs_dir.join(retired);
            if pin.exists() {
                match remove_pin(&pin) {
                    Ok(()) => {
                        info!(pin = %pin.display(), "removed a pin of an earlier agent version")
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        }
        Ok(Self {
            _ebpf: ebpf,
            logger,
            maps,
            attachments,
        })
    }

    /// Forwards pending eBPF log records to the agent's log.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }
}

fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    cgroup_id: u64,
    pin: &Path,
    config: &DataplaneConfig,
) -> Result<Attachment, DataplaneError> {
    let program_err = |error| DataplaneError::Program { name, error };
    let program = ebpf
        .program_mut(name)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .map_err(program_err)?;

    // Adopt an existing link when there is a live one on our cgroup.
    match sys::obj_get(pin) {
        Ok(link) => {
            let info = sys::cgroup_link_info(&link).map_err(|error| DataplaneError::Pin {
                context: "reading link",
                path: pin.to_path_buf(),
                error,
            })?;
            if info.cgroup_id == cgroup_id {
                let program_fd = program_fd(program).map_err(program_err)?;
                sys::link_update(link.as_fd(), program_fd.as_fd()).map_err(|error| {
                    DataplaneError::Pin {
                        context: "replacing the program of",
                        path: pin.to_path_buf(),
                        error,
                    }
                })?;
                return Ok(Attachment::Replaced {
                    old_program_id: info.program_id,
                });
            }
            if info.cgroup_id != 0 {
                return Err(DataplaneError::OtherCgroup {
                    pin: pin.to_path_buf(),
                    pinned: info.cgroup_id,
                    cgroup: config.cgroup.clone(),
                    wanted: cgroup_id,
                });
            }
            // The cgroup it was attached to is gone: the link is defunct, replace it.
            warn!(pin = %pin.display(), "pinned link's cgroup is gone; attaching anew");
            remove_pin(pin)?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(error) => {
            return Err(DataplaneError::Pin {
                context: "opening",
                path: pin.to_path_buf(),
                error,
            });
        }
    }

    let fd_link = match program {
        aya::programs::Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, LINK_MODE).map_err(program_err)?;
            FdLink::try_from(p.take_link(id).map_err(program_err)?)
        }
        aya::programs::Program::SockOps(p) => {
            let id = p.attach(cgroup, LINK_MODE).map_err(program_err)?;
            FdLink::try_from(p.take_link(id).map_err(program_err)?)
        }
        _ => {
            return Err(program_err(
                aya::programs::ProgramError::UnexpectedProgramType,
            ));
        }
    }
    .map_err(|e| program_err(e.into()))?;
    fd_link.pin(pin).map_err(|e| DataplaneError::Pin {
        context: "pinning",
        path: pin.to_path_buf(),
        error: io::Error::other(e),
    })?;
    Ok(Attachment::Attached)
}

/// Loads one program into the kernel (the verifier runs here).
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DataplaneError> {
    let program_err = |error| DataplaneError::Program { name, error };
    match ebpf.program_mut(name) {
        Some(aya::programs::Program::CgroupSockAddr(p)) => p.load(),
        Some(aya::programs::Program::SockOps(p)) => p.load(),
        Some(_) => Err(aya::programs::ProgramError::UnexpectedProgramType),
        None => Err(aya::programs::ProgramError::NotLoaded),
    }
    .map_err(program_err)
}

fn program_fd(
    program: &mut aya::programs::Program,
) -> Result<aya::programs::ProgramFd, aya::programs::ProgramError> {
    match program {
        aya::programs::Program::CgroupSockAddr(p) => p.fd()?.try_clone().map_err(Into::into),
        aya::programs::Program::SockOps(p) => p.fd()?.try_clone().map_err(Into::into),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

/// After a failed attachment: unpins the links this start created (dropping the last
/// reference detaches them). Links adopted from a previous agent stay, with the new program:
/// it passed the verifier and shares the pinned maps, so they keep redirecting.
fn roll_back(links_dir: &Path, done: &[(&'static str, Attachment)]) {
    for (name, attachment) in done {
        if *attachment == Attachment::Attached {
            let pin = links_dir.join(name);
            match remove_pin(&pin) {
                Ok(()) => warn!(program = name, "start failed: detached and unpinned again"),
                Err(e) => error!(
                    program = name,
                    "start failed, and unpinning failed too: {e}"
                ),
            }
        }
    }
}

fn prepare_dir(dir: &Path) -> Result<(), DataplaneError> {
    fs::create_dir_all(dir).map_err(|error| DataplaneError::Pin {
        context: "creating",
        path: dir.to_path_buf(),
        error,
    })?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::NotBpffs(dir.to_path_buf()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    sys::fs_type(path).is_ok_and(|t| t == BPF_FS_MAGIC)
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(error) => Err(DataplaneError::Pin {
            context: "removing",
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// Removes every link and map the agent pinned under `dir`, which detaches the programs (once no
/// running agent holds them) and frees the maps. Returns the pins removed.
pub fn cleanup(dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    let mut removed = Vec::new();
    let links_dir = dir.join("links");
    let pins = PROGRAMS
        .iter()
        .map(|p| links_dir.join(p))
        .chain(MAPS.iter().map(|m| dir.join(m)))
        .chain(RETIRED_PINS.iter().map(|p| dir.join(p)));
    for pin in pins {
        if pin.exists() {
            remove_pin(&pin)?;
            removed.push(pin);
        }
    }
    for d in [links_dir.as_path(), dir] {
        match fs::remove_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(error) => {
                return Err(DataplaneError::Pin {
                    context: "removing directory (it holds pins the agent did not make)",
                    path: d.to_path_buf(),
                    error,
                });
            }
        }
    }
    Ok(removed)
}

/// Program ids behind the pinned links, for `inspect`.
pub fn pinned_program_ids(dir: &Path) -> Vec<(&'static str, Option<sys::CgroupLinkInfo>)> {
    PROGRAMS
        .iter()
        .map(|name| {
            let info = sys::obj_get(&dir.join("links").join(name))
                .and_then(sys::cgroup_link_info)
                .ok();
            (*name, info)
        })
        .collect()
}
