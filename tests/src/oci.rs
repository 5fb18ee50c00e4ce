//! OCI image archives without a container engine: a layer is a tar written here (ustar,
//! deterministic: sorted entries, owner root, a fixed mtime), gzipped, and addressed by its
//! sha256; config, manifest and index are JSON. The archive is an OCI image layout in a tar
//! (what `skopeo copy oci-archive:...`, `podman load`, `ctr image import` and `docker load`
//! read), with Docker's `manifest.json` beside `index.json` for older `docker load`s.
//!
//! [`project_images`] describes the controller and agent images (used by `cargo xtask images`
//! and by the tests, so both build the same thing), [`write_archive`] writes one, and
//! [`read_archive`] reads one back, checking every digest and size.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

pub const CONTROLLER_IMAGE: &str = "ghcr.io/beamlit/beamlit-controller";
pub const AGENT_IMAGE: &str = "ghcr.io/beamlit/beamlit-agent";
/// The controller runs as this user (distroless' `nonroot`).
pub const NONROOT: &str = "65532:65532";
/// The agent runs as root, limited to the capabilities the chart adds (BPF, NET_ADMIN,
/// PERFMON): the bpffs pins and the cgroup directory belong to root on the node.
pub const ROOT: &str = "0:0";
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// A file system entry of the image's one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    /// A symbolic link to `target` (busybox's applets in the curl stand-in).
    Symlink {
        target: String,
    },
}

/// Everything an image is made of.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Repository, e.g. `ghcr.io/beamlit/beamlit-controller`.
    pub name: String,
    pub tag: String,
    pub entrypoint: Vec<String>,
    /// The default arguments (`CMD`), replaced by a pod's `args`.
    pub cmd: Vec<String>,
    pub user: String,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339; the commit's time, so that rebuilding the same commit gives the same image.
    pub created: String,
    /// Absolute paths in the image.
    pub files: BTreeMap<String, Entry>,
}

impl ImageSpec {
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// Version, source and revision of the build, for the labels.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub version: String,
    pub source: String,
    pub revision: String,
    pub created: String,
}

impl BuildInfo {
    /// The workspace version and repository, and the checked-out commit (`-dirty` when the
    /// work tree has changes, so that such an image is never mistaken for the commit's).
    pub fn from_git(root: &Path) -> Result<Self> {
        let git = |args: &[&str]| -> Result<String> {
            let out = Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .context("running git")?;
            if !out.status.success() {
                bail!(
                    "git {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let mut revision = git(&["rev-parse", "HEAD"])?;
        if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
            revision.push_str("-dirty");
        }
        Ok(Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: "https://github.com/beamlit/beamlit-controller".to_string(),
            revision,
            created: git(&["log", "-1", "--format=%cI"])?,
        })
    }
}

/// The labels of both images (OCI annotation keys, as Dockerfile `LABEL`s).
pub fn labels(title: &str, description: &str, info: &BuildInfo) -> BTreeMap<String, String> {
    [
        ("org.opencontainers.image.title", title),
        ("org.opencontainers.image.description", description),
        ("org.opencontainers.image.version", info.version.as_str()),
        ("org.opencontainers.image.source", info.source.as_str()),
        ("org.opencontainers.image.revision", info.revision.as_str()),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        ("org.opencontainers.image.vendor", "Beamlit"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The controller and agent images from the binaries in `bin_dir`: each binary (stripped) in
/// /usr/local/bin with the shared libraries it links (from `ldd`, the build machine's Debian
/// glibc), the CA bundle (TLS to Beamlit uses the system roots), and /etc/passwd and
/// /etc/group naming root and nonroot. No shell, no package manager.
pub fn project_images(bin_dir: &Path, info: &BuildInfo) -> Result<Vec<ImageSpec>> {
    let image = |binary: &str, repository: &str, user: &str, description: &str| -> Result<_> {
        let path = bin_dir.join(binary);
        let entrypoint = format!("/usr/local/bin/{binary}");
        let mut files = base_files()?;
        add_file(&mut files, &entrypoint, 0o755, stripped(&path)?);
        for lib in shared_libraries(&path)? {
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            add_file(&mut files, &lib.display().to_string(), 0o755, data);
        }
        Ok(ImageSpec {
            name: repository.to_string(),
            tag: info.version.clone(),
            entrypoint: vec![entrypoint],
            cmd: Vec::new(),
            user: user.to_string(),
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
                format!("SSL_CERT_FILE={CA_BUNDLE}"),
            ],
            labels: labels(binary, description, info),
            created: info.created.clone(),
            files,
        })
    };
    Ok(vec![
        image(
            "beamlit-controller",
            CONTROLLER_IMAGE,
            NONROOT,
            "Beamlit offloading controller: decides what share of each model's traffic to offload",
        )?,
        image(
            "beamlit-agent",
            AGENT_IMAGE,
            ROOT,
            "Beamlit offloading agent: eBPF redirection and the egress tunnel on every node",
        )?,
    ])
}

/// /etc/passwd, /etc/group, the CA bundle and /tmp.
pub(crate) fn base_files() -> Result<BTreeMap<String, Entry>> {
    let mut files = BTreeMap::new();
    add_file(
        &mut files,
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
            .to_vec(),
    );
    add_file(
        &mut files,
        "/etc/group",
        0o644,
        b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
    );
    let ca = std::fs::read(CA_BUNDLE).with_context(|| {
        format!("reading {CA_BUNDLE} (install Debian's ca-certificates: cargo xtask setup)")
    })?;
    add_file(&mut files, CA_BUNDLE, 0o644, ca);
    files.insert("/tmp".into(), Entry::Dir { mode: 0o1777 });
    files.insert("/home/nonroot".into(), Entry::Dir { mode: 0o755 });
    Ok(files)
}

pub(crate) fn add_file(files: &mut BTreeMap<String, Entry>, path: &str, mode: u32, data: Vec<u8>) {
    files.insert(path.to_string(), Entry::File { mode, data });
}

/// The binary without its symbol table (binutils' strip, present wherever cargo links): less
/// than half the size, same code.
pub(crate) fn stripped(binary: &Path) -> Result<Vec<u8>> {
    let out = std::env::temp_dir().join(format!(
        "beamlit-image-{}-{}",
        std::process::id(),
        binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .context("running strip (binutils)")?;
    let data = std::fs::read(&out);
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        bail!("strip {} failed: {status}", binary.display());
    }
    data.with_context(|| format!("reading the stripped {}", binary.display()))
}

/// The shared objects `binary` loads, as `ldd` resolves them (the loader included); empty for
/// a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
        if line.contains("not found") {
            bail!("{}: {line}", binary.display());
        }
    }
    Ok(libs)
}

/// Sizes of a written archive.
#[derive(Debug, Clone)]
pub struct ArchiveInfo {
    pub path: PathBuf,
    pub reference: String,
    pub archive_bytes: u64,
    pub layer_bytes: u64,
    pub unpacked_bytes: u64,
    pub manifest_digest: String,
}

/// An image's blobs, addressed by digest: what an archive holds and a registry receives.
pub struct ImageBlobs {
    pub layer: Vec<u8>,
    pub layer_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub unpacked_bytes: u64,
}

pub const OCI_MANIFEST_MEDIA_TYPE: &str = MANIFEST_MEDIA_TYPE;

fn image_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Layer, config and manifest of `spec`.
pub fn image_blobs(spec: &ImageSpec) -> Result<ImageBlobs> {
    let layer_tar = layer_tar(&spec.files);
    let unpacked_bytes = spec
        .files
        .values()
        .map(|e| match e {
            Entry::File { data, .. } => data.len() as u64,
            Entry::Dir { .. } | Entry::Symlink { .. } => 0,
        })
        .sum();
    let layer = gzip(&layer_tar);
    let diff_id = sha256(&layer_tar);
    let layer_digest = sha256(&layer);
    let arch = image_arch();
    let mut config = json!({
        "created": spec.created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": spec.user,
            "Entrypoint": spec.entrypoint,
            "Env": spec.env,
            "Labels": spec.labels,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": spec.created, "created_by": "cargo xtask images"}],
    });
    if !spec.cmd.is_empty() {
        config["config"]["Cmd"] = json!(spec.cmd);
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer.len()}],
        "annotations": spec.labels,
    }))?;
    let manifest_digest = sha256(&manifest);
    Ok(ImageBlobs {
        layer,
        layer_digest,
        config,
        config_digest,
        manifest,
        manifest_digest,
        unpacked_bytes,
    })
}

/// Writes `spec` as an OCI layout tar at `path`.
pub fn write_archive(spec: &ImageSpec, path: &Path) -> Result<ArchiveInfo> {
    let ImageBlobs {
        layer,
        layer_digest,
        config,
        config_digest,
        manifest,
        manifest_digest,
        unpacked_bytes,
    } = image_blobs(spec)?;
    let arch = image_arch();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {
                "org.opencontainers.image.ref.name": spec.tag,
                "io.containerd.image.name": spec.reference(),
            },
        }],
    }))?;
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": blob(&config_digest),
        "RepoTags": [spec.reference()],
        "Layers": [blob(&layer_digest)],
    }]))?;

    let mut archive = Tar::default();
    archive.dir("blobs", 0o755);
    archive.dir("blobs/sha256", 0o755);
    archive.file(&blob(&config_digest), 0o644, &config);
    archive.file(&blob(&layer_digest), 0o644, &layer);
    archive.file(&blob(&manifest_digest), 0o644, &manifest);
    archive.file("index.json", 0o644, &index);
    archive.file("manifest.json", 0o644, &docker_manifest);
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    let bytes = archive.finish();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(ArchiveInfo {
        path: path.to_path_buf(),
        reference: spec.reference(),
        archive_bytes: bytes.len() as u64,
        layer_bytes: layer.len() as u64,
        unpacked_bytes,
        manifest_digest,
    })
}

/// An archive read back, every blob checked against its digest and size.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    pub index: Value,
    pub manifest: Value,
    pub config: Value,
    /// Docker's manifest.json.
    pub docker_manifest: Value,
    /// The layer's entries by absolute path.
    pub files: BTreeMap<String, Entry>,
}

impl ImageArchive {
    pub fn entrypoint(&self) -> Vec<String> {
        strings(&self.config["config"]["Entrypoint"])
    }

    pub fn user(&self) -> &str {
        self.config["config"]["User"].as_str().unwrap_or_default()
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.config["config"]["Labels"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect()
    }

    pub fn file(&self, path: &str) -> Option<&[u8]> {
        match self.files.get(path) {
            Some(Entry::File { data, .. }) => Some(data),
            _ => None,
        }
    }

    /// Writes the layer into `dir` (an empty directory), as a runtime unpacks it.
    pub fn unpack(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        for (path, entry) in &self.files {
            let target = dir.join(path.trim_start_matches('/'));
            match entry {
                Entry::Dir { mode } => {
                    std::fs::create_dir_all(&target)?;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
                }
                Entry::File { mode, data } => {
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&target, data)?;
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
                }
                Entry::Symlink { target: to } => {
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::os::unix::fs::symlink(to, &target)?;
                }
            }
        }
        Ok(())
    }
}

pub fn read_archive(path: &Path) -> Result<ImageArchive> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let entries = read_tar(&bytes)?;
    let get = |name: &str| -> Result<&Vec<u8>> {
        match entries.get(name) {
            Some(Entry::File { data, .. }) => Ok(data),
            _ => Err(anyhow!("{} has no {name}", path.display())),
        }
    };
    let blob = |descriptor: &Value| -> Result<&Vec<u8>> {
        let digest = descriptor["digest"]
            .as_str()
            .ok_or_else(|| anyhow!("descriptor without a digest: {descriptor}"))?;
        let data = get(&format!(
            "blobs/sha256/{}",
            digest.trim_start_matches("sha256:")
        ))?;
        if sha256(data) != digest {
            bail!("blob {digest} does not match its digest");
        }
        if descriptor["size"].as_u64() != Some(data.len() as u64) {
            bail!("blob {digest} is not the size its descriptor says");
        }
        Ok(data)
    };
    let layout: Value = serde_json::from_slice(get("oci-layout")?)?;
    if layout["imageLayoutVersion"] != "1.0.0" {
        bail!("oci-layout: {layout}");
    }
    let index: Value = serde_json::from_slice(get("index.json")?)?;
    let manifests = index["manifests"]
        .as_array()
        .filter(|m| m.len() == 1)
        .ok_or_else(|| anyhow!("index.json should list one manifest: {index}"))?;
    let manifest: Value = serde_json::from_slice(blob(&manifests[0])?)?;
    let config: Value = serde_json::from_slice(blob(&manifest["config"])?)?;
    let layers = manifest["layers"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest without layers"))?;
    let mut files = BTreeMap::new();
    for (i, layer) in layers.iter().enumerate() {
        if layer["mediaType"] != LAYER_MEDIA_TYPE {
            bail!("layer {i}: media type {}", layer["mediaType"]);
        }
        let tar = gunzip(blob(layer)?)?;
        if config["rootfs"]["diff_ids"][i] != sha256(&tar) {
            bail!("layer {i} does not match its diff_id");
        }
        for (path, entry) in read_tar(&tar)? {
            files.insert(format!("/{}", path.trim_end_matches('/')), entry);
        }
    }
    let docker_manifest: Value = serde_json::from_slice(get("manifest.json")?)?;
    Ok(ImageArchive {
        index,
        manifest,
        config,
        docker_manifest,
        files,
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

pub fn sha256(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The layer: every parent directory, then the entries, in path order.
fn layer_tar(files: &BTreeMap<String, Entry>) -> Vec<u8> {
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let mut p = Path::new(path.as_str());
        while let Some(parent) = p.parent() {
            if parent != Path::new("/") {
                dirs.insert(parent.display().to_string());
            }
            p = parent;
        }
    }
    let mut tar = Tar::default();
    for dir in &dirs {
        if !files.contains_key(dir) {
            tar.dir(dir.trim_start_matches('/'), 0o755);
        }
    }
    for (path, entry) in files {
        let name = path.trim_start_matches('/');
        match entry {
            Entry::Dir { mode } => tar.dir(name, *mode),
            Entry::File { mode, data } => tar.file(name, *mode, data),
            Entry::Symlink { target } => tar.symlink(name, target),
        }
    }
    tar.finish()
}

/// A ustar writer: owner root, mtime 0 (reproducible; the image's time is in its config).
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn dir(&mut self, name: &str, mode: u32) {
        self.entry(&format!("{}/", name.trim_end_matches('/')), mode, b'5', &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, mode, b'0', data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry_linked(name, 0o777, b'2', &[], target);
    }

    fn entry(&mut self, name: &str, mode: u32, kind: u8, data: &[u8]) {
        self.entry_linked(name, mode, kind, data, "");
    }

    fn entry_linked(&mut self, name: &str, mode: u32, kind: u8, data: &[u8], link: &str) {
        let mut h = [0u8; 512];
        // Names over 100 bytes go into the 155-byte prefix, split at a slash.
        let (prefix, short) = if name.len() <= 100 {
            ("", name)
        } else {
            let split = name[..name.len().min(156)]
                .rfind('/')
                .filter(|&i| name.len() - i - 1 <= 100)
                .unwrap_or(0);
            (&name[..split], &name[split + 1..])
        };
        h[..short.len()].copy_from_slice(short.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[148..156].fill(b' ');
        h[156] = kind;
        h[157..157 + link.len().min(100)].copy_from_slice(&link.as_bytes()[..link.len().min(100)]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let checksum = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(checksum.as_bytes());
        self.out.extend_from_slice(&h);
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
}

/// Zero-padded octal with a trailing NUL, as ustar numeric fields are.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

fn parse_octal(field: &[u8]) -> Result<u64> {
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text.trim(), 8).with_context(|| format!("bad octal field {text:?}"))
}

/// Reads a ustar archive (what [`Tar`] writes; also plain files and directories of other
/// writers). Keys are the entry names as written (directories end with `/`).
pub fn read_tar(bytes: &[u8]) -> Result<BTreeMap<String, Entry>> {
    let mut entries = BTreeMap::new();
    let mut at = 0;
    while at + 512 <= bytes.len() {
        let h = &bytes[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored: u32 = parse_octal(&h[148..156])? as u32;
        let sum: u32 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if stored != sum {
            bail!("tar header checksum mismatch at byte {at}");
        }
        let field = |r: std::ops::Range<usize>| -> String {
            String::from_utf8_lossy(&h[r])
                .trim_end_matches('\0')
                .to_string()
        };
        let short = field(0..100);
        let prefix = field(345..500);
        let name = if prefix.is_empty() {
            short
        } else {
            format!("{prefix}/{short}")
        };
        let mode = parse_octal(&h[100..108])? as u32;
        let size = parse_octal(&h[124..136])? as usize;
        let start = at + 512;
        let end = start + size;
        if end > bytes.len() {
            bail!("tar entry {name} runs past the end");
        }
        let entry = match h[156] {
            b'5' => Entry::Dir { mode },
            b'2' => Entry::Symlink {
                target: field(157..257),
            },
            b'0' | 0 => Entry::File {
                mode,
                data: bytes[start..end].to_vec(),
            },
            other => bail!("tar entry {name}: type {} not supported", other as char),
        };
        entries.insert(name.trim_end_matches('/').to_string(), entry);
        at = start + size.div_ceil(512) * 512;
    }
    Ok(entries)
}

/// gzip (RFC 1952) around a raw deflate stream; no name and no time in the header, so the same
/// input always gives the same bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3];
    out.extend(miniz_oxide::deflate::compress_to_vec(data, 9));
    let _ = out.write_all(&crc32fast::hash(data).to_le_bytes());
    let _ = out.write_all(&(data.len() as u32).to_le_bytes());
    out
}

pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    if data.len() < 18 || data[..3] != [0x1f, 0x8b, 8] {
        bail!("not gzip");
    }
    if data[3] != 0 {
        bail!("gzip header flags are not supported");
    }
    let body = &data[10..data.len() - 8];
    let out =
        miniz_oxide::inflate::decompress_to_vec(body).map_err(|e| anyhow!("inflating: {e:?}"))?;
    let trailer = &data[data.len() - 8..];
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if crc != crc32fast::hash(&out) {
        bail!("gzip CRC mismatch");
    }
    Ok(out)
}

/// A Dockerfile's `FROM`, `USER`, `ENTRYPOINT` (exec form), `LABEL`s (with `ARG` defaults
/// substituted) and `COPY` destinations, for comparing it with an [`ImageSpec`].
#[derive(Debug, Clone, Default)]
pub struct Dockerfile {
    pub from: String,
    pub user: String,
    pub entrypoint: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub copies: Vec<(String, String)>,
    pub args: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
}

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Self> {
        let mut d = Self::default();
        // Join continuation lines, drop comments.
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            if let Some(head) = trimmed.strip_suffix('\\') {
                current.push_str(head);
                current.push(' ');
            } else {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
        for line in logical {
            let (instruction, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let rest = rest.trim();
            match instruction.to_ascii_uppercase().as_str() {
                "FROM" => d.from = rest.split_whitespace().next().unwrap_or("").to_string(),
                "ARG" => {
                    let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                    d.args.insert(k.to_string(), unquote(v));
                }
                "USER" => d.user = rest.to_string(),
                "ENV" => {
                    for (k, v) in split_label_pairs(rest)? {
                        let v = d.substitute(&v);
                        d.env.insert(k, v);
                    }
                }
                "ENTRYPOINT" => {
                    d.entrypoint = serde_json::from_str(rest)
                        .with_context(|| format!("ENTRYPOINT is not in exec form: {rest}"))?
                }
                "LABEL" => {
                    for (k, v) in split_label_pairs(rest)? {
                        let v = d.substitute(&v);
                        d.labels.insert(k, v);
                    }
                }
                "COPY" => {
                    let parts: Vec<&str> = rest
                        .split_whitespace()
                        .filter(|p| !p.starts_with("--"))
                        .collect();
                    if let [src, dst] = parts[..] {
                        d.copies.push((src.to_string(), dst.to_string()));
                    }
                }
                _ => {}
            }
        }
        Ok(d)
    }

    fn substitute(&self, value: &str) -> String {
        let mut out = value.to_string();
        for (k, v) in &self.args {
            out = out.replace(&format!("${{{k}}}"), v);
        }
        out
    }
}

fn unquote(v: &str) -> String {
    v.trim().trim_matches('"').to_string()
}

/// `k1="v 1" k2=v2` of a LABEL instruction.
fn split_label_pairs(text: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| anyhow!("LABEL without `=`: {rest}"))?;
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or_else(|| anyhow!("unterminated quote in LABEL: {after}"))?;
            (quoted[..end].to_string(), &quoted[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        pairs.push((key.trim().to_string(), value));
        rest = next.trim();
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_round_trip_with_long_names() {
        let mut files = BTreeMap::new();
        let long = format!("/{}/{}", "d".repeat(80), "f".repeat(60));
        add_file(&mut files, &long, 0o644, b"hello".to_vec());
        add_file(&mut files, "/usr/local/bin/x", 0o755, vec![1; 1000]);
        files.insert("/tmp".into(), Entry::Dir { mode: 0o1777 });
        let tar = layer_tar(&files);
        let back = read_tar(&tar).expect("reads");
        assert_eq!(
            back.get(long.trim_start_matches('/')),
            Some(&Entry::File {
                mode: 0o644,
                data: b"hello".to_vec()
            })
        );
        assert_eq!(back.get("tmp"), Some(&Entry::Dir { mode: 0o1777 }));
        assert!(matches!(
            back.get("usr/local"),
            Some(Entry::Dir { mode: 0o755 })
        ));
        // Deterministic.
        assert_eq!(tar, layer_tar(&files));
    }

    #[test]
    fn gzip_round_trip() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let z = gzip(&data);
        assert!(z.len() < data.len() / 10);
        assert_eq!(gunzip(&z).expect("gunzip"), data);
        assert_eq!(z, gzip(&data));
    }

    #[test]
    fn dockerfile_parsing() {
        let d = Dockerfile::parse(
            "# c\nFROM base:1 AS x\nARG VERSION=0.1.0\nLABEL a=\"x y\" \\\n  b=${VERSION}\n\
             COPY --chmod=755 target/x /usr/local/bin/x\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/x\"]\n",
        )
        .expect("parses");
        assert_eq!(d.from, "base:1");
        assert_eq!(d.labels["a"], "x y");
        assert_eq!(d.labels["b"], "0.1.0");
        assert_eq!(d.user, "65532:65532");
        assert_eq!(d.entrypoint, vec!["/usr/local/bin/x"]);
        assert_eq!(
            d.copies,
            vec![("target/x".to_string(), "/usr/local/bin/x".to_string())]
        );
    }
}
