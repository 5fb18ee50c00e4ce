//! Self-tests of the harness. Privileged: they skip without root (and fail in CI).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use beamlit_testbed::{
    ProbeOptions, TestCgroup, TestDir, Topology, cgroup_prefix, cgroup2_mount, finish_probe,
    list_netns, netns_prefix, require_privileges, run_in, run_probe, spawn, spawn_probe,
    start_server, start_server_multi,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("valid socket address in test")
}

fn leftover_netns(prefix: &str) -> Result<Vec<String>> {
    Ok(list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect())
}

fn leftover_cgroups(prefix: &str) -> Result<Vec<PathBuf>> {
    let root = cgroup2_mount()?;
    Ok(std::fs::read_dir(root)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect())
}

fn pid_alive(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still show "Z".
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn services_reach_the_backend_pod_v4_and_v6() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let hint = "svc";
    let cg_path;
    {
        let mut topo = Topology::new(hint)?;
        let client = topo.add_pod("client")?;
        let backend = topo.add_pod("backend")?;
        assert_eq!(client.ipv4.to_string(), "10.200.1.2");
        assert_eq!(backend.ipv6.to_string(), "fd00:200:2::2");
        let cg = TestCgroup::new(hint)?;
        cg_path = cg.path().to_path_buf();

        let be_v4 = SocketAddr::from((backend.ipv4, 8080));
        let be_v6 = SocketAddr::from((backend.ipv6, 8080));
        let _server = start_server_multi(&backend.netns, None, &[be_v4, be_v6], "local", false)?;
        topo.add_service(addr("10.96.0.10:80"), be_v4)?;
        topo.add_service(addr("[fd00:96::10]:80"), be_v6)?;

        for service in ["10.96.0.10:80", "[fd00:96::10]:80"] {
            let mut opts = ProbeOptions::new(addr(service), 20);
            opts.check_peer = true;
            let report = run_probe(&client.netns, Some(cg.path()), &opts)?;
            assert_eq!(report.attempts, 20, "{service}: {report:?}");
            assert_eq!(report.ok, 20, "{service}: {report:?}");
            assert_eq!(report.failed, 0, "{service}: {report:?}");
            assert_eq!(report.count("local"), 20, "{service}: {report:?}");
            // DNAT is undone on the replies, so the client sees the Service address.
            assert_eq!(report.peer_mismatch, 0, "{service}: {report:?}");
            assert!(report.connect_us.max >= report.connect_us.p50, "{report:?}");
        }
        // The probe ran (and exited) inside the cgroup, which is empty again.
        assert!(!cg.populated()?);
    }
    assert_eq!(leftover_netns(&netns_prefix(hint))?, Vec::<String>::new());
    assert!(!cg_path.exists(), "{} left behind", cg_path.display());
    assert!(leftover_cgroups(&cgroup_prefix(hint))?.is_empty());
    Ok(())
}

#[test]
fn a_panicking_test_still_cleans_up() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let hint = "panic";
    let mut seen: Option<(Vec<String>, PathBuf, u32)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut topo = Topology::new(hint).expect("topology");
        let pod = topo.add_pod("a").expect("pod");
        topo.add_service(addr("10.96.0.11:80"), SocketAddr::from((pod.ipv4, 8080)))
            .expect("service");
        let cg = TestCgroup::new(hint).expect("cgroup");
        let child = cg.child("inner").expect("child cgroup");
        // Not held in a guard: the cgroup teardown alone must kill it.
        let mut sleeper = pod.netns.cmd("sleep");
        sleeper.arg("600");
        let guard = spawn(sleeper, Some(child.path())).expect("spawn");
        let pid = guard.pid();
        std::mem::forget(guard);
        seen = Some((
            leftover_netns(&netns_prefix(hint)).expect("list"),
            cg.path().to_path_buf(),
            pid,
        ));
        panic!("deliberate panic inside a test");
    }));
    assert!(result.is_err());
    let (namespaces, cg_path, pid) = seen.context("closure did not record its state")?;
    assert_eq!(
        namespaces.len(),
        2,
        "node + one pod existed: {namespaces:?}"
    );
    assert_eq!(leftover_netns(&netns_prefix(hint))?, Vec::<String>::new());
    assert!(!cg_path.exists(), "{} left behind", cg_path.display());
    // The forgotten child was killed by the cgroup teardown; reap it.
    // SAFETY: waitpid on our own (forgotten) child.
    let reaped = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
    assert_eq!(reaped, pid as i32, "sleeper {pid} should have been killed");
    Ok(())
}

#[test]
fn spawned_children_are_in_the_cgroup_and_the_pod_namespace() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let mut topo = Topology::new("place")?;
    let pod = topo.add_pod("p")?;
    let cg = TestCgroup::new("place")?;
    let mut cmd = pod.netns.cmd("sleep");
    cmd.arg("600");
    let mut guard = spawn(cmd, Some(cg.path()))?;
    let pid = guard.pid();

    let cgroup_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mount = cgroup2_mount()?;
    let rel = cg.path().strip_prefix(&mount)?;
    assert!(
        cgroup_line
            .lines()
            .any(|l| l == format!("0::/{}", rel.display())),
        "{cgroup_line}"
    );
    assert_eq!(cg.procs()?, vec![pid as i32]);

    let ns_ino = std::fs::metadata(format!("/run/netns/{}", pod.netns.name()))?.ino();
    // `ip netns exec` execs in place, so the pid is the program itself, already
    // switched; poll briefly in case we look before the switch.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let child_ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino();
        if child_ino == ns_ino {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "child never entered {}",
            pod.netns.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(cg.id()? > 1);

    guard.kill()?;
    assert!(!pid_alive(pid));

    let mut cat = pod.netns.cmd("cat");
    cat.arg("/proc/self/cgroup");
    let out = run_in(Some(cg.path()), cat)?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&rel.display().to_string()));
    Ok(())
}

#[test]
fn dropping_a_cgroup_kills_its_processes_even_nested() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let cg = TestCgroup::new("kill")?;
    let inner = cg.child("inner")?;
    let mut pids = Vec::new();
    for path in [cg.path(), inner.path()] {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let guard = spawn(cmd, Some(path))?;
        pids.push(guard.pid());
        std::mem::forget(guard);
    }
    let (outer_path, inner_path) = (cg.path().to_path_buf(), inner.path().to_path_buf());
    // Parent first, on purpose: the child's own Drop must then be a no-op.
    drop(cg);
    assert!(!outer_path.exists());
    drop(inner);
    assert!(!inner_path.exists());
    for pid in pids {
        // SAFETY: reaping our own forgotten children.
        let reaped = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
        assert_eq!(reaped, pid as i32);
    }
    Ok(())
}

#[test]
fn probe_reports_failures_marks_and_the_tunnel_address() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let mut topo = Topology::new("probe")?;
    let client = topo.add_pod("client")?;
    let backend = topo.add_pod("backend")?;
    let cg = TestCgroup::new("probe")?;

    // The node's tunnel address stands in for the egress tunnel in agent tests.
    let tunnel_v4 = SocketAddr::from((topo.node_addr_v4(), 9000));
    let tunnel_v6 = SocketAddr::from((topo.node_addr_v6(), 9000));
    let _tunnel = start_server_multi(topo.node(), None, &[tunnel_v4, tunnel_v6], "tunnel", false)?;
    for target in [tunnel_v4, tunnel_v6] {
        let mut opts = ProbeOptions::new(target, 10);
        opts.mark = Some(0x4b1d);
        opts.concurrency = Some(3);
        opts.check_peer = true;
        let report = run_probe(&client.netns, Some(cg.path()), &opts)?;
        assert_eq!((report.attempts, report.ok), (10, 10), "{report:?}");
        assert_eq!(report.count("tunnel"), 10, "{report:?}");
        assert_eq!(report.peer_mismatch, 0);
    }

    // Nothing listens on the backend's port 81: every attempt is refused.
    let mut opts = ProbeOptions::new(SocketAddr::from((backend.ipv4, 81)), 5);
    opts.timeout_ms = Some(500);
    let report = run_probe(&client.netns, Some(cg.path()), &opts)?;
    assert_eq!(
        (report.attempts, report.ok, report.failed),
        (5, 0, 5),
        "{report:?}"
    );
    assert!(
        report.errors.iter().any(|e| e.contains("refused")),
        "{report:?}"
    );

    // HTTP mode, and a Service whose backend is replaced.
    let _web = start_server(
        &backend.netns,
        None,
        SocketAddr::from((backend.ipv4, 8081)),
        "web",
        true,
    )?;
    topo.add_service(addr("10.96.0.20:80"), SocketAddr::from((backend.ipv4, 81)))?;
    topo.add_service(
        addr("10.96.0.20:80"),
        SocketAddr::from((backend.ipv4, 8081)),
    )?;
    let mut opts = ProbeOptions::new(addr("10.96.0.20:80"), 10);
    opts.http = true;
    let report = run_probe(&client.netns, Some(cg.path()), &opts)?;
    assert_eq!(report.count("web"), 10, "{report:?}");
    topo.remove_service(addr("10.96.0.20:80"))?;
    let mut opts = ProbeOptions::new(addr("10.96.0.20:80"), 1);
    opts.timeout_ms = Some(300);
    let report = run_probe(&client.netns, Some(cg.path()), &opts)?;
    assert_eq!(report.ok, 0, "service removed: {report:?}");

    // --until-file keeps probing until the file appears.
    let dir = TestDir::new("probe")?;
    let stop = dir.join("stop");
    let mut opts = ProbeOptions::new(tunnel_v4, 0);
    opts.until_file = Some(stop.clone());
    opts.interval_ms = Some(10);
    let probe = spawn_probe(&client.netns, Some(cg.path()), &opts)?;
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&stop, b"")?;
    let report = finish_probe(probe, Duration::from_secs(10))?;
    let dir_path = dir.path().to_path_buf();
    drop(dir);
    assert!(!dir_path.exists());
    assert!(report.attempts >= 3, "{report:?}");
    assert_eq!(report.ok, report.attempts, "{report:?}");
    Ok(())
}

#[test]
fn netprobe_rejects_bad_arguments() -> Result<()> {
    let bin = Path::new(env!("CARGO_BIN_EXE_netprobe"));
    for args in [
        &["connect", "--count", "1"][..],
        &["connect", "--addr", "nope", "--count", "1"],
        &[
            "connect",
            "--addr",
            "10.0.0.1:1",
            "--count",
            "1",
            "--mark",
            "0xzz",
        ],
        &["serve", "--name", "x"],
        &["frobnicate"],
        &[],
    ] {
        let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage:"),
            "{args:?}"
        );
    }
    Ok(())
}

#[test]
fn netprobe_bin_is_found_next_to_the_test() {
    assert_eq!(
        beamlit_testbed::netprobe_bin().canonicalize().ok(),
        Path::new(env!("CARGO_BIN_EXE_netprobe"))
            .canonicalize()
            .ok()
    );
}
