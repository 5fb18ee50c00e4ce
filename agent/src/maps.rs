//! Typed access to the pinned maps. Both the running agent and `inspect`/`cleanup` open the maps
//! from their pins, so every reader sees the same objects whether or not an agent is running.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use beamlit_common::{AgentConfig, ServiceCounters, ServiceEntry, ServiceKey, map_names};

use crate::plan::Change;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "map {path} is not pinned; is the agent installed on this node (`beamlit-agent run`), and \
         is --bpffs the directory it uses?"
    )]
    NotPinned { path: PathBuf },
    #[error("map {path}: {source}")]
    Map { path: PathBuf, source: MapError },
    #[error("writing service {service}: {source}")]
    Write { service: String, source: MapError },
}

pub struct PinnedMaps {
    dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    counters: PerCpuArray<MapData, ServiceCounters>,
    config: Array<MapData, AgentConfig>,
    exempt: HashMap<MapData, u64, u8>,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            services: open(dir, map_names::SERVICES)?,
            counters: open(dir, map_names::SERVICE_COUNTERS)?,
            config: open(dir, map_names::CONFIG)?,
            exempt: open(dir, map_names::EXEMPT_CGROUPS)?,
        })
    }

    pub fn services(&self) -> Result<BTreeMap<ServiceKey, ServiceEntry>, MapsError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| self.err(map_names::SERVICES, source))
    }

    /// A service's counters, summed over CPUs.
    pub fn counters(&self, entry: &ServiceEntry) -> Result<ServiceCounters, MapsError> {
        match self.counters.get(&entry.counter_slot, 0) {
            Ok(per_cpu) => {
                Ok(per_cpu
                    .iter()
                    .fold(ServiceCounters::default(), |a, c| ServiceCounters {
                        local: a.local + c.local,
                        redirected: a.redirected + c.redirected,
                        fail_open: a.fail_open + c.fail_open,
                        bypassed: a.bypassed + c.bypassed,
                    }))
            }
            Err(source) => Err(self.err(map_names::SERVICE_COUNTERS, source)),
        }
    }

    pub fn config(&self) -> Result<AgentConfig, MapsError> {
        self.config
            .get(&0, 0)
            .map_err(|source| self.err(map_names::CONFIG, source))
    }

    /// Records that the tunnel is alive now (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns).
    pub fn beat(&mut self) -> Result<(), MapsError> {
        let mut config = self.config()?;
        config.tunnel_heartbeat_ns = monotonic_ns();
        self.set_config(config)
    }

    pub fn set_config(&mut self, config: AgentConfig) -> Result<(), MapsError> {
        let result = self.config.set(0, &config, 0);
        result.map_err(|source| self.err(map_names::CONFIG, source))
    }

    /// The cgroup ids never redirected ([`crate::exempt`]).
    pub fn exempt_cgroups(&self) -> Result<BTreeSet<u64>, MapsError> {
        self.exempt
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| self.err(map_names::EXEMPT_CGROUPS, source))
    }

    /// Makes `ids` the exempt cgroups: adds the new ones first, then removes the others.
    pub fn set_exempt_cgroups(&mut self, ids: &BTreeSet<u64>) -> Result<(), MapsError> {
        let now = self.exempt_cgroups()?;
        for id in ids.difference(&now) {
            self.exempt
                .insert(id, &1, 0)
                .map_err(|source| self.err(map_names::EXEMPT_CGROUPS, source))?;
        }
        for id in now.difference(ids) {
            match self.exempt.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => return Err(self.err(map_names::EXEMPT_CGROUPS, source)),
            }
        }
        Ok(())
    }

    /// Applies changes from [`crate::plan::plan`]. A fresh counter slot is zeroed before the
    /// entry that points to it becomes visible to the programs.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), MapsError> {
        for change in changes {
            match change {
                Change::Upsert {
                    key,
                    entry,
                    fresh_slot,
                } => {
                    let write_err = |source| MapsError::Write {
                        service: describe(key),
                        source,
                    };
                    if *fresh_slot {
                        let zeros =
                            zeroed_counters().map_err(|e| write_err(MapError::IoError(e)))?;
                        self.counters
                            .set(entry.counter_slot, zeros, 0)
                            .map_err(write_err)?;
                    }
                    self.services.insert(key, entry, 0).map_err(write_err)?;
                }
                Change::Remove(key) => match self.services.remove(key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(source) => {
                        return Err(MapsError::Write {
                            service: describe(key),
                            source,
                        });
                    }
                },
            }
        }
        Ok(())
    }

    fn err(&self, name: &str, source: MapError) -> MapsError {
        MapsError::Map {
            path: self.dir.join(name),
            source,
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

fn zeroed_counters() -> std::io::Result<PerCpuValues<ServiceCounters>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    PerCpuValues::try_from(vec![ServiceCounters::default(); cpus.get() as usize])
}

fn describe(key: &ServiceKey) -> String {
    crate::model::key_addr(key).map_or_else(|| format!("{key:?}"), |a| a.to_string())
}

fn open<T>(dir: &Path, name: &str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    if !path.exists() {
        return Err(MapsError::NotPinned { path });
    }
    let err = |source| MapsError::Map {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let map = Map::from_map_data(data).map_err(err)?;
    T::try_from(map).map_err(err)
}
