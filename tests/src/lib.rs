//! Harness for the privileged tests, benchmarks and the demo.
//!
//! Everything a test builds here (network namespaces, cgroups, child processes,
//! nftables rules) lives in objects that tear themselves down in `Drop`, so a
//! failing or panicking test leaves nothing behind. Names carry the pid and a
//! per-process counter so tests in parallel threads and processes never collide.
//!
//! [`cluster`] adds a real Kubernetes control plane (pinned etcd, kube-apiserver,
//! kube-controller-manager) with simulated nodes whose pods are network
//! namespaces of a [`Topology`], and kube-proxy-like Service routing.
//!
//! Safety rules the API is built around (the machine is shared):
//! - eBPF programs are only ever attached to a [`TestCgroup`], never the root cgroup;
//! - every address a test talks to lives in namespaces the test created ([`Topology`]);
//!   nothing is sent from the machine's own namespace.
//!
//! ```no_run
//! use beamlit_testbed::{ProbeOptions, TestCgroup, Topology, require_privileges, run_probe, start_server};
//! # fn main() -> anyhow::Result<()> {
//! if !require_privileges() {
//!     return Ok(());
//! }
//! let mut topo = Topology::new("example")?;
//! let client = topo.add_pod("client")?;
//! let backend = topo.add_pod("backend")?;
//! let cg = TestCgroup::new("example")?;
//! let _srv = start_server(&backend.netns, None, (backend.ipv4, 8080).into(), "local", false)?;
//! topo.add_service("10.96.0.10:80".parse()?, (backend.ipv4, 8080).into())?;
//! let report = run_probe(&client.netns, Some(cg.path()), &ProbeOptions::new("10.96.0.10:80".parse()?, 20))?;
//! assert_eq!(report.count("local"), 20);
//! # Ok(())
//! # }
//! ```

mod agent;
mod cgroup;
pub mod chart;
pub mod cluster;
pub mod crds;
pub mod fake_beamlit;
pub mod hpa_oracle;
pub mod metrics_adapter;
mod naming;
mod netns;
pub mod oci;
mod privileges;
mod probe;
mod process;
pub mod product;
pub mod seed;
mod tempdir;
pub mod tls;
mod topology;

pub use agent::{
    AgentFixture, TUNNEL_UID, has_service_entry, start_tunnel_process, vm_hwm_kib,
    write_service_entry,
};
pub use cgroup::TestCgroup;
pub use fake_beamlit::{FakeBeamlit, FakeBeamlitOptions, FakeStats};
pub use naming::{cgroup_prefix, cleanup_stale, netns_prefix};
pub use netns::{Netns, list_netns};
pub use privileges::{cgroup2_mount, require_privileges};
pub use probe::{
    LatencyStats, ProbeOptions, ProbeReport, agent_bin, controller_bin, finish_probe, netprobe_bin,
    probe_command, run_probe, spawn_probe, start_server, start_server_multi, try_agent_bin,
    try_netprobe_bin, try_xtask_bin,
};
pub use process::{ChildGuard, run_in, spawn};
pub use tempdir::TestDir;
pub use tls::TestCa;
pub use topology::{Pod, Topology};

/// `result.or_panic()` in tests: panics with the whole error chain (`{:#}`), which `expect`'s
/// Debug output of an anyhow error only partly shows.
pub trait OrPanic<T> {
    fn or_panic(self) -> T;
}

impl<T, E: Into<anyhow::Error>> OrPanic<T> for std::result::Result<T, E> {
    #[track_caller]
    fn or_panic(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => {
                let e: anyhow::Error = e.into();
                panic!("{e:#}")
            }
        }
    }
}
