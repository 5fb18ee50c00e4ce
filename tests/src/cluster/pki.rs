//! Certificates and keys for a throwaway control plane, made on the spot: one
//! CA, the apiserver's serving certificate (loopback only), client
//! certificates for the admin and kube-controller-manager, and the
//! service-account signing key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// File paths of everything [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub controller_manager_cert: PathBuf,
    pub controller_manager_key: PathBuf,
    /// Signs service-account tokens (PKCS#8).
    pub service_account_key: PathBuf,
    /// Verifies them (SPKI public key).
    pub service_account_pub: PathBuf,
}

/// PEM text of a client identity, for kubeconfigs.
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Writes the PKI into `dir/pki` (keys mode 0600) and returns the paths plus the
/// admin and controller-manager identities.
pub fn generate(dir: &Path) -> Result<(Pki, ClientIdentity, ClientIdentity)> {
    let pki_dir = dir.join("pki");
    std::fs::create_dir_all(&pki_dir)?;

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_params = ca_params();
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, org: Option<&str>, server: bool| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(cn, org);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if server {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.subject_alt_names = vec![
                SanType::IpAddress([127, 0, 0, 1].into()),
                // The first address of the Service CIDR: `kubernetes.default`.
                SanType::IpAddress([10, 96, 0, 1].into()),
                // Where real nodes and pods reach it (`real_nodes::APISERVER_ADDR`).
                SanType::IpAddress(super::real_nodes::APISERVER_ADDR.into()),
                SanType::DnsName("localhost".try_into()?),
                SanType::DnsName("kubernetes".try_into()?),
                SanType::DnsName("kubernetes.default".try_into()?),
                SanType::DnsName("kubernetes.default.svc".try_into()?),
            ];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = p.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };

    let (api_cert, api_key) = leaf("kube-apiserver", None, true).context("apiserver cert")?;
    let (admin_cert, admin_key) =
        leaf("beamlit-admin", Some("system:masters"), false).context("admin cert")?;
    let (kcm_cert, kcm_key) =
        leaf("system:kube-controller-manager", None, false).context("controller cert")?;
    let sa = KeyPair::generate().context("service-account key")?;
    let (sa_key, sa_pub) = (sa.serialize_pem(), sa.public_key_pem());

    let pki = pki_paths(&pki_dir);
    write(&pki.ca_cert, &ca_pem, false)?;
    // Kept so that identities for real nodes can be signed after the control plane starts.
    write(&pki_dir.join("ca.key"), &ca_key_pem, true)?;
    write(&pki.apiserver_cert, &api_cert, false)?;
    write(&pki.apiserver_key, &api_key, true)?;
    write(&pki.admin_cert, &admin_cert, false)?;
    write(&pki.admin_key, &admin_key, true)?;
    write(&pki.controller_manager_cert, &kcm_cert, false)?;
    write(&pki.controller_manager_key, &kcm_key, true)?;
    write(&pki.service_account_key, &sa_key, true)?;
    write(&pki.service_account_pub, &sa_pub, false)?;
    Ok((
        pki,
        ClientIdentity {
            cert_pem: admin_cert,
            key_pem: admin_key,
        },
        ClientIdentity {
            cert_pem: kcm_cert,
            key_pem: kcm_key,
        },
    ))
}

/// Where [`generate`] writes each file of the PKI in `pki_dir`.
fn pki_paths(pki_dir: &Path) -> Pki {
    Pki {
        ca_cert: pki_dir.join("ca.crt"),
        apiserver_cert: pki_dir.join("apiserver.crt"),
        apiserver_key: pki_dir.join("apiserver.key"),
        admin_cert: pki_dir.join("admin.crt"),
        admin_key: pki_dir.join("admin.key"),
        controller_manager_cert: pki_dir.join("controller-manager.crt"),
        controller_manager_key: pki_dir.join("controller-manager.key"),
        service_account_key: pki_dir.join("sa.key"),
        service_account_pub: pki_dir.join("sa.pub"),
    }
}

/// What [`generate`] wrote into `dir/pki`, read back (the control plane of a real-node cluster
/// starts after the cluster network has signed its identities with the same CA).
pub fn load(dir: &Path) -> Result<(Pki, ClientIdentity, ClientIdentity)> {
    let pki_dir = dir.join("pki");
    let pki = pki_paths(&pki_dir);
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let admin = ClientIdentity {
        cert_pem: read(&pki.admin_cert)?,
        key_pem: read(&pki.admin_key)?,
    };
    let kcm = ClientIdentity {
        cert_pem: read(&pki.controller_manager_cert)?,
        key_pem: read(&pki.controller_manager_key)?,
    };
    Ok((pki, admin, kcm))
}

fn ca_params() -> CertificateParams {
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("beamlit-test-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
}

/// What a certificate signed by [`sign`] is for.
pub enum Usage<'a> {
    Client,
    /// A serving certificate for these IP addresses.
    Server(&'a [std::net::Ipv4Addr]),
}

/// A certificate for `cn` (and organisation, i.e. group, `org`) signed by the CA that
/// [`generate`] wrote into `dir/pki`.
pub fn sign(dir: &Path, cn: &str, org: Option<&str>, usage: Usage<'_>) -> Result<ClientIdentity> {
    let pki_dir = dir.join("pki");
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki_dir.join("ca.key"))?)
        .context("reading the CA key")?;
    // The same parameters and key give the same issuer name and key identifier as the CA
    // certificate carries (rcgen derives the identifier from the public key).
    let issuer = Issuer::new(ca_params(), ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn, org);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    match usage {
        Usage::Client => p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Server(ips) => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.subject_alt_names = ips
                .iter()
                .map(|ip| SanType::IpAddress((*ip).into()))
                .collect();
        }
    }
    let cert = p.signed_by(&key, &issuer)?;
    Ok(ClientIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes an identity as `<name>.crt` and `<name>.key` (0600) into `dir`; returns both paths.
pub fn write_identity(dir: &Path, name: &str, id: &ClientIdentity) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    write(&cert, &id.cert_pem, false)?;
    write(&key, &id.key_pem, true)?;
    Ok((cert, key))
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A kubeconfig with the CA and a client certificate, embedded so the file is
/// self-contained.
pub fn kubeconfig(server: &str, ca_pem: &str, id: &ClientIdentity, user: &str) -> String {
    use base64_lite::encode;
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: beamlit-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: beamlit-test\n  context:\n    cluster: beamlit-test\n    user: {user}\n    namespace: default\ncurrent-context: beamlit-test\n",
        ca = encode(ca_pem.as_bytes()),
        cert = encode(id.cert_pem.as_bytes()),
        key = encode(id.key_pem.as_bytes()),
    )
}

/// Standard base64 (RFC 4648, with padding): all a kubeconfig needs, without a
/// dependency for it.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn rfc4648_vectors() {
            for (i, o) in [
                ("", ""),
                ("f", "Zg=="),
                ("fo", "Zm8="),
                ("foo", "Zm9v"),
                ("foob", "Zm9vYg=="),
                ("fooba", "Zm9vYmE="),
                ("foobar", "Zm9vYmFy"),
            ] {
                assert_eq!(super::encode(i.as_bytes()), o);
            }
        }
    }
}
