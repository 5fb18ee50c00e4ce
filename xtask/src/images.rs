//! `cargo xtask images`: OCI image archives of the controller and the agent, built from the
//! release binaries without a container engine (see `beamlit_testbed::oci`, which the tests use
//! to build and check the same images). `images/*.Dockerfile` describe the same images for
//! users who build with Docker; a test keeps them equivalent.
use std::path::PathBuf;

use anyhow::Context as _;
use beamlit_testbed::oci;

use crate::{cargo, project_root};

#[derive(clap::Args)]
pub struct ImagesArgs {
    /// Where the archives go (`<name>.tar`, e.g. target/images/beamlit-controller.tar).
    #[arg(long, default_value = "target/images")]
    out: PathBuf,
    /// Use the release binaries already built instead of running `cargo build --release`.
    #[arg(long)]
    no_build: bool,
}

pub fn images(args: &ImagesArgs) -> anyhow::Result<()> {
    let root = project_root();
    if !args.no_build {
        build_release_binaries()?;
    }
    let info = oci::BuildInfo::from_git(&root)?;
    let out = root.join(&args.out);
    let specs = oci::project_images(&root.join("target/release"), &info)
        .context("assembling the images (run without --no-build to build the binaries)")?;
    println!(
        "[images] version {} revision {}",
        info.version, info.revision
    );
    for spec in &specs {
        let file = spec
            .name
            .rsplit('/')
            .next()
            .map_or_else(|| "image".to_string(), |n| format!("{n}.tar"));
        let written = oci::write_archive(spec, &out.join(file))?;
        println!(
            "[images] {}  {}  archive {}, layer {} compressed, {} unpacked, user {}, manifest {}",
            written.reference,
            written.path.display(),
            mib(written.archive_bytes),
            mib(written.layer_bytes),
            mib(written.unpacked_bytes),
            spec.user,
            written.manifest_digest,
        );
    }
    println!(
        "[images] load with `skopeo copy oci-archive:<file> docker-daemon:<ref>`, `podman load -i`, \
         `ctr image import` or `docker load -i`"
    );
    Ok(())
}

/// The release agent and controller the images carry (`target/release`).
pub(crate) fn build_release_binaries() -> anyhow::Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "beamlit-agent",
        "-p",
        "beamlit-controller",
        "--bins",
    ])
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
