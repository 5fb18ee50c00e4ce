//! The images a real-node cluster pulls from its registry, built here without an engine
//! ([`crate::oci`]), and the registry client that pushes them (the distribution API over plain
//! HTTP, from inside the cluster network: the registry has no other address).
//!
//! - `registry.k8s.io/pause`, `registry.k8s.io/coredns/coredns` and
//!   `registry.k8s.io/metrics-server/metrics-server`: the binaries of [`NodeBinaries`].
//! - `registry.k8s.io/hpa-example`: a stand-in for the seed's php-apache image. `netprobe serve`
//!   on port 80 answers `OK!` like the real index.php, names the pod in `X-Served-By` (and whether
//!   the request carried an `Authorization` header in `X-Saw-Authorization`), and
//!   computes a million square roots per request as index.php does, so CPU metrics move.
//! - `docker.io/curlimages/curl`: Debian's curl with its libraries and busybox's shell and
//!   applets, with the real image's `/entrypoint.sh` behaviour (`curl` when the first argument
//!   is an option, else the command given).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::node_tools::{COREDNS_VERSION, METRICS_SERVER_VERSION, NodeBinaries, PAUSE_IMAGE};
use crate::Netns;
use crate::oci::{
    self, BuildInfo, Entry, ImageSpec, NONROOT, OCI_MANIFEST_MEDIA_TYPE, ROOT, add_file,
    base_files, shared_libraries, stripped,
};

pub const HPA_EXAMPLE_IMAGE: &str = "registry.k8s.io/hpa-example";
pub const CURL_IMAGE: &str = "docker.io/curlimages/curl";
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns";
pub const METRICS_SERVER_IMAGE: &str = "registry.k8s.io/metrics-server/metrics-server";
/// Square roots per request: php-apache's index.php loop.
const HPA_EXAMPLE_BURN: &str = "1000000";
const BUSYBOX: &str = "/bin/busybox";
/// The applets the seed's curl loop and the tests use (`sh -c "while true; do ..."`).
const APPLETS: &[&str] = &[
    "sh", "grep", "sleep", "cat", "echo", "ls", "env", "head", "seq", "wc", "date", "true",
];

/// Every image a real-node cluster needs besides the project's own.
pub fn node_images(
    bins: &NodeBinaries,
    netprobe: &Path,
    info: &BuildInfo,
) -> Result<Vec<ImageSpec>> {
    let (pause_name, pause_tag) = PAUSE_IMAGE
        .rsplit_once(':')
        .context("PAUSE_IMAGE has no tag")?;
    let single = |name: &str, tag: &str, binary: &str, user: &str| -> Result<ImageSpec> {
        let mut files = base_files()?;
        let path = format!("/{binary}");
        add_file(&mut files, &path, 0o755, read(&bins.path(binary))?);
        Ok(spec(name, tag, vec![path], Vec::new(), user, files, info))
    };
    let mut images = vec![
        single(pause_name, pause_tag, "pause", ROOT)?,
        single(COREDNS_IMAGE, COREDNS_VERSION, "coredns", ROOT)?,
        single(
            METRICS_SERVER_IMAGE,
            METRICS_SERVER_VERSION,
            "metrics-server",
            NONROOT,
        )?,
    ];

    let mut files = base_files()?;
    with_libraries(&mut files, netprobe, "/usr/local/bin/netprobe")?;
    images.push(spec(
        HPA_EXAMPLE_IMAGE,
        "latest",
        [
            "/usr/local/bin/netprobe",
            "serve",
            "--listen",
            "0.0.0.0:80",
            "--http",
        ]
        .map(String::from)
        .into(),
        [
            "--name-env",
            "HOSTNAME",
            "--body",
            "OK!",
            "--burn",
            HPA_EXAMPLE_BURN,
        ]
        .map(String::from)
        .into(),
        ROOT,
        files,
        info,
    ));

    let mut files = base_files()?;
    with_libraries(&mut files, Path::new("/usr/bin/curl"), "/usr/bin/curl")?;
    let busybox = Path::new(BUSYBOX);
    add_file(
        &mut files,
        BUSYBOX,
        0o755,
        read(busybox).context("busybox-static is needed for the curl image (cargo xtask setup)")?,
    );
    for applet in APPLETS {
        files.insert(
            format!("/bin/{applet}"),
            Entry::Symlink {
                target: "busybox".into(),
            },
        );
    }
    add_file(
        &mut files,
        "/entrypoint.sh",
        0o755,
        b"#!/bin/sh\nset -e\nif [ \"${1#-}\" != \"${1}\" ] || [ -z \"$(command -v \"${1}\")\" ]; then\n  set -- curl \"$@\"\nfi\nexec \"$@\"\n".to_vec(),
    );
    images.push(spec(
        CURL_IMAGE,
        "latest",
        vec!["/entrypoint.sh".into()],
        vec!["curl".into()],
        NONROOT,
        files,
        info,
    ));
    Ok(images)
}

fn spec(
    name: &str,
    tag: &str,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: &str,
    files: BTreeMap<String, Entry>,
    info: &BuildInfo,
) -> ImageSpec {
    ImageSpec {
        name: name.to_string(),
        tag: tag.to_string(),
        entrypoint,
        cmd,
        user: user.to_string(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_string()],
        labels: oci::labels(name, "test stand-in built by beamlit-testbed", info),
        created: info.created.clone(),
        files,
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `binary` at `at`, and every shared library it loads at its own path.
fn with_libraries(files: &mut BTreeMap<String, Entry>, binary: &Path, at: &str) -> Result<()> {
    add_file(files, at, 0o755, stripped(binary)?);
    for lib in shared_libraries(binary)? {
        add_file(files, &lib.display().to_string(), 0o755, read(&lib)?);
    }
    Ok(())
}

/// The repository path of `name` in a registry that mirrors its host:
/// `registry.k8s.io/coredns/coredns` → `coredns/coredns`; a name without a host (Docker Hub's
/// short form) stays as it is.
pub fn mirror_path(name: &str) -> &str {
    match name.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') => rest,
        _ => name,
    }
}

/// Pushes `spec` to the registry at `registry`, dialled from inside `netns`.
pub fn push(netns: &Netns, registry: SocketAddr, spec: &ImageSpec) -> Result<()> {
    let blobs = oci::image_blobs(spec)?;
    let repo = mirror_path(&spec.name);
    let connect = || -> Result<TcpStream> {
        let stream = netns
            .enter(move || TcpStream::connect_timeout(&registry, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(stream)
    };
    for (digest, data) in [
        (&blobs.layer_digest, &blobs.layer),
        (&blobs.config_digest, &blobs.config),
    ] {
        let head = request(
            &mut connect()?,
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            &[],
        )?;
        if head.status == 200 {
            continue;
        }
        let start = request(
            &mut connect()?,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            &[],
        )?;
        if start.status != 202 {
            bail!(
                "registry: starting an upload to {repo}: HTTP {}",
                start.status
            );
        }
        let location = start
            .header("location")
            .context("registry: upload without a Location")?;
        // Location is absolute or a path; keep the path and query.
        let path = location
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
            .unwrap_or_else(|| location.to_string());
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = request(
            &mut connect()?,
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        )?;
        if put.status != 201 {
            bail!(
                "registry: uploading {digest} to {repo}: HTTP {}",
                put.status
            );
        }
    }
    let put = request(
        &mut connect()?,
        "PUT",
        &format!("/v2/{repo}/manifests/{}", spec.tag),
        &[("Content-Type", OCI_MANIFEST_MEDIA_TYPE)],
        &blobs.manifest,
    )?;
    if put.status != 201 {
        bail!(
            "registry: putting the manifest of {repo}:{}: HTTP {}",
            spec.tag,
            put.status
        );
    }
    Ok(())
}

pub(crate) struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`); the body of the answer
/// is read and dropped.
pub(crate) fn request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: registry\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("registry: bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if method != "HEAD" {
        let _ = reader.read_to_end(&mut Vec::new());
    }
    Ok(Response { status, headers })
}

#[cfg(test)]
mod tests {
    use super::mirror_path;

    #[test]
    fn mirror_paths_drop_the_host() {
        assert_eq!(
            mirror_path("registry.k8s.io/coredns/coredns"),
            "coredns/coredns"
        );
        assert_eq!(mirror_path("docker.io/curlimages/curl"), "curlimages/curl");
        assert_eq!(
            mirror_path("ghcr.io/beamlit/beamlit-agent"),
            "beamlit/beamlit-agent"
        );
        assert_eq!(mirror_path("curlimages/curl"), "curlimages/curl");
        assert_eq!(mirror_path("10.250.0.1:5000/x"), "x");
    }
}
