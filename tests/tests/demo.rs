//! `cargo xtask demo` as a user runs it (the xtask binary, non-interactive), on real nodes (its
//! default): the seed's walkthrough completes with zero failed requests, a final decision of
//! `Healthy` and a timeline picture, and Ctrl-C in the middle leaves nothing behind. One real
//! cluster at a time (the tests take turns): two would share two cores.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use beamlit_testbed::{ChildGuard, TestDir, list_netns, require_privileges, spawn, try_xtask_bin};

/// The tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn demo_command(out: &std::path::Path) -> Result<Command> {
    let mut cmd = Command::new(try_xtask_bin()?);
    cmd.args(["demo", "--ci", "--prebuilt", "--out"])
        .arg(out)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    Ok(cmd)
}

#[test]
fn the_demo_runs_the_seed_walkthrough_with_zero_failed_requests() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TestDir::new("demo")?;
    let out = demo_command(dir.path())?.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "kubectl scale deployment php-apache --replicas=0",
        "Route: local",
        "Route: beamlit",
        "NoReadyEndpoints",
        "failed                             0",
        "the controller's decision now      0% (Healthy)",
        "helm install beamlit-controller oci://",
    ] {
        assert!(
            stdout.contains(needle),
            "the demo's output lacks {needle:?}:\n{stdout}"
        );
    }
    // One token per party: the node's tunnel, the other node's, the controller's Beamlit API.
    let tokens: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("OAuth token requests to Beamlit"))
        .context("no token count")?
        .trim()
        .parse()?;
    assert!(
        (1..=3).contains(&tokens),
        "{tokens} token requests:\n{stdout}"
    );
    let svg = std::fs::read_to_string(dir.join("timeline.svg")).context("the timeline picture")?;
    assert!(
        svg.contains("<svg") && svg.contains("scale --replicas=0"),
        "{svg}"
    );
    Ok(())
}

/// Everything the demo process made carries its pid in the name (namespaces, cgroups, pins,
/// temporary directories, the processes' arguments).
fn leftovers(pid: u32) -> Result<Vec<String>> {
    let tag = format!("-{pid}-");
    let mut found: Vec<String> = list_netns()?
        .into_iter()
        .filter(|n| n.contains(&tag))
        .map(|n| format!("netns {n}"))
        .collect();
    let cgroup_root = beamlit_testbed::cgroup2_mount()?;
    for dir in [cgroup_root, "/sys/fs/bpf".into(), std::env::temp_dir()] {
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("beamlit-test-") && name.contains(&tag) {
                found.push(format!("{}/{name}", dir.display()));
            }
        }
    }
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if (text.contains("beamlit-test-") || text.contains("bt-")) && text.contains(&tag) {
            found.push(format!(
                "process {}: {text}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    Ok(found)
}

#[test]
fn ctrl_c_in_the_middle_of_the_demo_leaves_nothing_behind() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TestDir::new("demoint")?;
    let mut cmd = demo_command(dir.path())?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut demo: ChildGuard = spawn(cmd, None)?;
    let pid = demo.pid();
    let stdout = demo.take_stdout().context("demo output")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(240)) {
            Ok(line) => {
                let running = line.contains("Route: local");
                seen.push_str(&line);
                seen.push('\n');
                if running {
                    break;
                }
            }
            Err(_) => bail!("the demo never got to its request loop:\n{seen}"),
        }
        if started.elapsed() > Duration::from_secs(360) {
            bail!("the demo never got to its request loop:\n{seen}");
        }
    }
    assert!(
        !leftovers(pid)?.is_empty(),
        "the demo made nothing this check could see"
    );
    demo.signal(libc::SIGINT)?;
    let status = demo
        .wait_timeout(Duration::from_secs(60))?
        .context("the demo did not exit within 60 s of Ctrl-C")?;
    while let Ok(line) = rx.try_recv() {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(status.success(), "exit {status} after Ctrl-C:\n{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
    let left = leftovers(pid)?;
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:#?}");
    Ok(())
}
