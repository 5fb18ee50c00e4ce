//! Where the programs attach: the one module that decides which cgroup v2 directory.
//!
//! - `pods` (the default): the kubelet's pods cgroup of this node, `kubepods` (cgroupfs driver)
//!   or `kubepods.slice` (systemd driver), in the unified hierarchy. Every pod of the node is
//!   below it, and nothing else: kubelet, the container runtime and host daemons keep their own
//!   connections, and the programs run before any attached at the root by another product.
//!   Found from the agent's own pod (`--pod-uid`, the downward API's metadata.uid): the
//!   directory of that pod, then its nearest `kubepods` ancestor. That also picks the right one
//!   on a machine that runs several kubelets (each with its own cgroupRoot).
//! - `node`: the root of the cgroup v2 hierarchy, every process of the node.
//! - `--cgroup DIR`: exactly that directory.
//!
//! Every path is checked to be on a cgroup2 filesystem before any program is loaded: a tmpfs
//! (the `/sys/fs/cgroup` of a cgroup v1 or hybrid node) makes the kernel fail much later with
//! "bpf_link_create failed ... Bad file descriptor", which says nothing about the fix.
use std::{
    collections::VecDeque,
    fs, io,
    path::{Path, PathBuf},
};

/// statfs(2) f_type values.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Where a hybrid node mounts its unified hierarchy, below the tmpfs at /sys/fs/cgroup.
const HYBRID_UNIFIED: &str = "unified";
/// Directories visited while looking for the agent's pod; a node has a few per pod.
const SEARCH_LIMIT: usize = 200_000;

/// What to attach to when no `--cgroup` is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachTo {
    /// The kubelet's pods cgroup (`kubepods` or `kubepods.slice`): every pod, no host daemon.
    #[default]
    Pods,
    /// The cgroup v2 root: every process of the node, kubelet and host daemons included.
    Node,
}

/// The directory chosen, and how (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    pub how: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{path} is {found}, not a cgroup v2 filesystem{hint}; give the node's cgroup2 mount \
         (`grep cgroup2 /proc/mounts` on the node, e.g. /sys/fs/cgroup or, on hybrid nodes, \
         /sys/fs/cgroup/unified): with the Helm chart, set agent.hostPaths.cgroup2"
    )]
    NotCgroup2 {
        path: PathBuf,
        found: &'static str,
        hint: &'static str,
    },
    #[error(
        "no cgroup2 mount in /proc/mounts: the agent needs the unified cgroup hierarchy (a \
         cgroup v2 or hybrid node); pass --cgroup-root with its mount point"
    )]
    NoMount,
    #[error(
        "no kubelet pods cgroup (`kubepods` or `kubepods.slice`) {detail} under {root}; attach \
         to the whole node with --attach-to node (chart: agent.attachTo=node), or name the \
         directory with --cgroup"
    )]
    NoPodsCgroup { root: PathBuf, detail: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
}

/// The filesystem at `path`, by statfs.
fn fs_type(path: &Path) -> Result<i64, CgroupError> {
    crate::sys::fs_type(path).map_err(|error| CgroupError::Io {
        path: path.to_path_buf(),
        error,
    })
}

fn fs_name(f_type: i64) -> &'static str {
    match f_type {
        CGROUP2_SUPER_MAGIC => "cgroup2",
        CGROUP_SUPER_MAGIC => "a cgroup v1 hierarchy",
        TMPFS_MAGIC => "a tmpfs",
        _ => "another filesystem",
    }
}

/// `path` itself when it is on cgroup2.
pub fn check_cgroup2(path: &Path) -> Result<(), CgroupError> {
    match fs_type(path)? {
        CGROUP2_SUPER_MAGIC => Ok(()),
        other => Err(CgroupError::NotCgroup2 {
            path: path.to_path_buf(),
            found: fs_name(other),
            hint: "",
        }),
    }
}

/// The unified hierarchy's mount point: `given` if it is cgroup2, or its `unified`
/// subdirectory on a hybrid node (`/sys/fs/cgroup` is a tmpfs there); without `given`, the
/// first cgroup2 mount of /proc/mounts.
pub fn cgroup2_mount(given: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let Some(given) = given else {
        let mounts = fs::read_to_string("/proc/mounts").map_err(|error| CgroupError::Io {
            path: "/proc/mounts".into(),
            error,
        })?;
        return cgroup2_in_mounts(&mounts).ok_or(CgroupError::NoMount);
    };
    let found = fs_type(given)?;
    if found == CGROUP2_SUPER_MAGIC {
        return Ok(given.to_path_buf());
    }
    let unified = given.join(HYBRID_UNIFIED);
    if found == TMPFS_MAGIC && matches!(fs_type(&unified), Ok(CGROUP2_SUPER_MAGIC)) {
        return Ok(unified);
    }
    Err(CgroupError::NotCgroup2 {
        path: given.to_path_buf(),
        found: fs_name(found),
        hint: if found == TMPFS_MAGIC {
            " (a cgroup v1 or hybrid node, with no unified hierarchy at <path>/unified)"
        } else {
            ""
        },
    })
}

fn cgroup2_in_mounts(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// Whether `name` is the cgroup directory of the pod `uid`: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
fn is_pod_dir(name: &str, uid: &str) -> bool {
    if name.strip_prefix("pod") == Some(uid) {
        return true;
    }
    let systemd = format!("pod{}.slice", uid.replace('-', "_"));
    name.starts_with("kubepods") && name.ends_with(&systemd)
}

/// The cgroup v2 directory of pod `uid` below `within` (the pods cgroup), if the kubelet has
/// made it, and its cgroup id (the directory's inode number, what the programs' helpers return).
pub fn pod_cgroup(within: &Path, uid: &str) -> Option<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = find_dir(within, |name| is_pod_dir(name, uid))?;
    let id = fs::metadata(&dir).ok()?.ino();
    Some((dir, id))
}

fn is_kubepods(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice"
}

/// The pods cgroup below `root` (a cgroup2 mount): the nearest `kubepods` ancestor of the
/// directory of pod `pod_uid`; without a pod (or when its directory is not found), a
/// `kubepods` directly below `root`.
pub fn pods_cgroup(root: &Path, pod_uid: Option<&str>) -> Result<PathBuf, CgroupError> {
    let uid = pod_uid.map(str::trim).filter(|u| !u.is_empty());
    if let Some(uid) = uid
        && let Some(pod_dir) = find_dir(root, |name| is_pod_dir(name, uid))
    {
        let found = pod_dir
            .ancestors()
            .take_while(|a| a.starts_with(root) && *a != root)
            .find(|a| {
                a.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_kubepods)
            });
        return found
            .map(Path::to_path_buf)
            .ok_or_else(|| CgroupError::NoPodsCgroup {
                root: root.to_path_buf(),
                detail: format!(
                    "above this agent's pod cgroup {} (a kubelet with cgroupsPerQOS off?)",
                    pod_dir.display()
                ),
            });
    }
    for name in ["kubepods", "kubepods.slice"] {
        let dir = root.join(name);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    Err(CgroupError::NoPodsCgroup {
        root: root.to_path_buf(),
        detail: match uid {
            Some(uid) => format!("(neither this agent's pod {uid} nor a top-level kubepods)"),
            None => "directly (and no --pod-uid to find it from the agent's own pod)".into(),
        },
    })
}

/// Breadth-first, so the shallowest match wins; bounded, so a huge tree cannot stall start-up.
fn find_dir(root: &Path, matches: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let mut queue = VecDeque::from([root.to_path_buf()]);
    let mut visited = 0;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > SEARCH_LIMIT {
            return None;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_str().is_some_and(&matches) {
                return Some(path);
            }
            queue.push_back(path);
        }
    }
    None
}

/// The directory to attach to, checked to be on cgroup2.
pub fn resolve(
    explicit: Option<&Path>,
    attach_to: AttachTo,
    root: Option<&Path>,
    pod_uid: Option<&str>,
) -> Result<Target, CgroupError> {
    if let Some(dir) = explicit {
        check_cgroup2(dir)?;
        return Ok(Target {
            path: dir.to_path_buf(),
            how: "--cgroup".into(),
        });
    }
    let mount = cgroup2_mount(root)?;
    let target = match attach_to {
        AttachTo::Node => Target {
            path: mount,
            how: "the cgroup v2 root: every process of the node (--attach-to node)".into(),
        },
        AttachTo::Pods => Target {
            path: pods_cgroup(&mount, pod_uid)?,
            how: "the kubelet's pods cgroup: every pod of the node, no host process".into(),
        },
    };
    check_cgroup2(&target.path)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree standing for a cgroup hierarchy (pods_cgroup only walks directories).
    struct Tree(PathBuf);

    impl Tree {
        fn new(dirs: &[&str]) -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root = std::env::temp_dir()
                .join(format!("beamlit-cgroup-test-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for d in dirs {
                fs::create_dir_all(root.join(d)).expect("creating the test tree");
            }
            Self(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const UID: &str = "0b6c2f6e-1d2a-4c55-9a0e-5a1f0c2d3e4f";

    #[test]
    fn the_agents_pod_leads_to_its_kubepods() {
        let cases: &[(&[&str], &str)] = &[
            // cgroupfs driver, burstable pod.
            (
                &[&format!("kubepods/burstable/pod{UID}/c1"), "system"],
                "kubepods",
            ),
            // systemd driver.
            (
                &[&format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-1.scope",
                    UID.replace('-', "_")
                )],
                "kubepods.slice",
            ),
            // Guaranteed pods sit right below kubepods.
            (&[&format!("kubepods/pod{UID}")], "kubepods"),
            // Two kubelets on one machine (each with a cgroupRoot): the one holding our pod.
            (
                &[
                    "test/n1/kubepods/besteffort/podother",
                    &format!("test/n2/kubepods/burstable/pod{UID}/c"),
                ],
                "test/n2/kubepods",
            ),
        ];
        for (dirs, want) in cases {
            let tree = Tree::new(dirs);
            let got = pods_cgroup(&tree.0, Some(UID)).expect("found");
            assert_eq!(got, tree.0.join(want), "{dirs:?}");
        }
    }

    #[test]
    fn a_pod_cgroup_is_found_by_uid_with_its_id() {
        use std::os::unix::fs::MetadataExt as _;
        let tree = Tree::new(&[
            "kubepods/besteffort/podother/c",
            &format!("kubepods/burstable/pod{UID}/c1"),
        ]);
        let (dir, id) = pod_cgroup(&tree.0.join("kubepods"), UID).expect("found");
        assert_eq!(dir, tree.0.join(format!("kubepods/burstable/pod{UID}")));
        assert_eq!(id, fs::metadata(&dir).expect("stat").ino());
        assert!(pod_cgroup(&tree.0.join("kubepods"), "missing-uid").is_none());
    }

    #[test]
    fn without_the_pod_a_top_level_kubepods_is_used() {
        let tree = Tree::new(&["kubepods/besteffort", "init.scope"]);
        assert_eq!(
            pods_cgroup(&tree.0, None).expect("found"),
            tree.0.join("kubepods")
        );
        assert_eq!(
            pods_cgroup(&tree.0, Some("not-here")).expect("found"),
            tree.0.join("kubepods")
        );
    }

    #[test]
    fn nothing_found_says_what_to_set() {
        let tree = Tree::new(&["system.slice/containerd.service"]);
        let e = pods_cgroup(&tree.0, Some(UID))
            .expect_err("no kubepods")
            .to_string();
        assert!(e.contains("--attach-to node") && e.contains(UID), "{e}");
        let tree = Tree::new(&[&format!("machine/pod{UID}")]);
        let e = pods_cgroup(&tree.0, Some(UID))
            .expect_err("no ancestor")
            .to_string();
        assert!(e.contains("above this agent's pod cgroup"), "{e}");
    }

    #[test]
    fn pod_directory_names_of_both_drivers() {
        assert!(is_pod_dir(&format!("pod{UID}"), UID));
        assert!(is_pod_dir(
            &format!("kubepods-besteffort-pod{}.slice", UID.replace('-', "_")),
            UID
        ));
        assert!(!is_pod_dir(&format!("pod{UID}x"), UID));
        assert!(!is_pod_dir("pod", UID));
    }

    #[test]
    fn a_tmpfs_is_refused_with_the_chart_value_to_set() {
        // /dev/shm is a tmpfs on every Linux machine this runs on; /proc is neither.
        let e = cgroup2_mount(Some(Path::new("/dev/shm")))
            .expect_err("tmpfs")
            .to_string();
        assert!(
            e.contains("is a tmpfs, not a cgroup v2 filesystem")
                && e.contains("agent.hostPaths.cgroup2")
                && e.contains("/sys/fs/cgroup/unified"),
            "{e}"
        );
        let e = check_cgroup2(Path::new("/proc"))
            .expect_err("procfs")
            .to_string();
        assert!(e.contains("another filesystem"), "{e}");
    }

    #[test]
    fn sys_fs_cgroup_leads_to_the_unified_hierarchy_on_v2_and_hybrid_machines() {
        // This machine's own layout: cgroup2 at /sys/fs/cgroup (v2) or at
        // /sys/fs/cgroup/unified below a tmpfs (hybrid, as on the CI machines).
        let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        let root = cgroup2_in_mounts(&mounts).expect("a cgroup2 mount on this machine");
        assert!(
            root == Path::new("/sys/fs/cgroup") || root == Path::new("/sys/fs/cgroup/unified"),
            "unexpected layout {}",
            root.display()
        );
        assert_eq!(
            cgroup2_mount(Some(Path::new("/sys/fs/cgroup"))).expect("found"),
            root
        );
    }

    #[test]
    fn the_first_cgroup2_mount_is_the_root() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_in_mounts(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_in_mounts("proc /proc proc rw 0 0\n"), None);
    }
}
