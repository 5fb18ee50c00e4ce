//! Builds the eBPF programs (agent-ebpf) with the nightly pinned in agent-ebpf/rust-toolchain.toml
//! and embeds the object in the agent binary.
use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    println!("cargo::rerun-if-changed=../common/src");
    let toolchain = pinned_channel(&toolchain_file)?;

    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let object = Path::new(&out_dir).join("beamlit-agent-ebpf");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // clippy/doc runs without the eBPF toolchain: embed an empty placeholder so
        // `include_bytes_aligned!` compiles; loading it fails with a clear error at run time.
        if !object.exists() {
            fs::write(&object, []).context("writing the placeholder eBPF object")?;
        }
    }
    let ebpf = aya_build::Package {
        name: "beamlit-agent-ebpf",
        root_dir: ebpf_dir
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain))
}

/// The `channel = "..."` line of rust-toolchain.toml: one place pins the eBPF nightly.
fn pinned_channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_string())
        .next()
        .ok_or_else(|| anyhow!("no channel = \"...\" in {}", path.display()))
}
