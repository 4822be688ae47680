//! Mutual TLS between the coordinator and the workers: every gRPC server asks for a client
//! certificate signed by the cluster's CA, and every client checks the server's certificate
//! against the same CA.
//!
//! Workers are dialled by IP address (pod IPs, `--advertise-host`), so certificates are checked
//! against one cluster-wide name instead (`--tls-server-name`, default `caravan`): issue every
//! node's certificate with `subjectAltName = DNS:caravan`. docs/SECURITY.md shows the openssl
//! commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name certificates are issued for when `--tls-server-name` is not given.
pub const DEFAULT_SERVER_NAME: &str = "caravan";

/// The TLS flags the coordinator and the worker share (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate (PEM) for mutual TLS; with --tls-key and --tls-ca, its gRPC
    /// service requires client certificates signed by that CA, and it presents this one to the
    /// services it calls. A coordinator's local workers get the same files.
    #[arg(long, env = "CARAVAN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "CARAVAN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster's CA certificate (PEM): peers must present certificates it signed.
    #[arg(long, env = "CARAVAN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name peers' certificates are checked against (their subjectAltName), whatever
    /// address they are reached at.
    #[arg(long, env = "CARAVAN_TLS_SERVER_NAME", default_value = DEFAULT_SERVER_NAME)]
    pub tls_server_name: String,
}

impl TlsArgs {
    /// The configured TLS, or `None` for plaintext.
    pub fn load(&self) -> Result<Option<ClusterTls>> {
        ClusterTls::load(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
            Some(&self.tls_server_name),
        )
    }
}

/// TLS to etcd, with etcdctl's names for the files: the CA that etcd's server certificate must
/// be signed by turns it on (the endpoints must then be `https://`), and a client certificate
/// and key are presented to an etcd started with `--client-cert-auth`. Separate from the
/// cluster's own `--tls-*` files, since etcd usually has a CA of its own.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// CA certificate (PEM) that etcd's server certificate must be signed by; turns on TLS to
    /// etcd (--etcd-endpoints must then be https:// URLs).
    #[arg(long, env = "CARAVAN_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present to etcd (for etcd's --client-cert-auth); needs
    /// --etcd-key and --etcd-cacert.
    #[arg(long, env = "CARAVAN_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "CARAVAN_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS settings for a client of etcd at `endpoints`, or `None` for plaintext. Reads and
    /// checks the files now, and that the endpoints' scheme agrees, so a mistake fails at
    /// start-up with the flag to fix.
    pub fn client_config_for(&self, endpoints: &[String]) -> Result<Option<ClientTlsConfig>> {
        let config = self.client_config()?;
        for endpoint in endpoints {
            match (endpoint.starts_with("https://"), config.is_some()) {
                (true, false) => bail!(
                    "etcd endpoint {endpoint} is https:// but --etcd-cacert is not given: pass \
                     etcd's CA certificate (and --etcd-cert/--etcd-key if etcd requires client \
                     certificates)"
                ),
                (false, true) => bail!(
                    "--etcd-cacert turns on TLS to etcd, but endpoint {endpoint} is not https://"
                ),
                _ => {}
            }
        }
        Ok(config)
    }

    /// [`EtcdTlsArgs::client_config_for`] without the endpoints' check.
    fn client_config(&self) -> Result<Option<ClientTlsConfig>> {
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read_pem(cert, "etcd client certificate")?,
                read_pem(key, "etcd client key")?,
            )),
            _ => bail!("--etcd-cert and --etcd-key go together: give both or neither"),
        };
        let Some(ca) = &self.etcd_cacert else {
            if identity.is_some() {
                bail!(
                    "--etcd-cert needs --etcd-cacert, the CA that etcd's certificate is signed by"
                );
            }
            return Ok(None);
        };
        let config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca, "etcd CA")?));
        Ok(Some(match identity {
            Some(identity) => config.identity(identity),
            None => config,
        }))
    }
}

/// The contents of the PEM file at `path` (the `what` of an error message).
fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))?;
    if !pem.windows(10).any(|w| w == b"-----BEGIN") {
        bail!("{} is not a PEM file (the {what})", path.display());
    }
    Ok(pem)
}

/// A node's certificate and key, and the CA its peers must be signed by.
#[derive(Clone)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
    server_name: String,
    /// The files, to hand on to child processes (`--local-workers`).
    pub files: TlsFiles,
}

/// The PEM files behind a [`ClusterTls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub server_name: String,
}

impl TlsFiles {
    /// The command-line flags that reproduce these settings.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--tls-cert={}", self.cert.display()),
            format!("--tls-key={}", self.key.display()),
            format!("--tls-ca={}", self.ca.display()),
            format!("--tls-server-name={}", self.server_name),
        ]
    }
}

impl ClusterTls {
    /// All three files, or none (plaintext). Reads and checks them now, so a missing file fails
    /// at start-up rather than at the first connection.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        server_name: Option<&str>,
    ) -> Result<Option<Self>> {
        let (cert, key, ca) = match (cert, key, ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), Some(a)) => (c, k, a),
            _ => bail!("--tls-cert, --tls-key and --tls-ca go together: give all three or none"),
        };
        let cert_pem = read_pem(cert, "TLS certificate")?;
        let key_pem = read_pem(key, "TLS key")?;
        let ca_pem = read_pem(ca, "TLS CA certificate")?;
        let server_name = server_name.unwrap_or(DEFAULT_SERVER_NAME).to_string();
        Ok(Some(ClusterTls {
            identity: Identity::from_pem(cert_pem, key_pem),
            ca: Certificate::from_pem(ca_pem),
            server_name: server_name.clone(),
            files: TlsFiles {
                cert: absolute(cert)?,
                key: absolute(key)?,
                ca: absolute(ca)?,
                server_name,
            },
        }))
    }

    /// For a gRPC server: present our certificate, require one from the CA of every client.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// For a gRPC client: check the server against the CA and the cluster name, present ours.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(self.server_name.clone())
    }
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("files", &self.files)
            .finish()
    }
}

/// `url` with the scheme that matches whether TLS is on (`https://` or `http://`).
pub fn with_scheme(url: &str, tls: bool) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    format!("{}://{rest}", if tls { "https" } else { "http" })
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_files_or_none() {
        assert!(ClusterTls::load(None, None, None, None).unwrap().is_none());
        let err = ClusterTls::load(Some(Path::new("a")), None, None, None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("go together"), "{err}");
        let err = ClusterTls::load(
            Some(Path::new("/nonexistent/cert.pem")),
            Some(Path::new("/nonexistent/key.pem")),
            Some(Path::new("/nonexistent/ca.pem")),
            None,
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("/nonexistent/cert.pem"),
            "{err:#}"
        );
    }

    #[test]
    fn etcd_tls_needs_its_ca_and_both_halves_of_an_identity() {
        let args = |ca: Option<&str>, cert: Option<&str>, key: Option<&str>| EtcdTlsArgs {
            etcd_cacert: ca.map(PathBuf::from),
            etcd_cert: cert.map(PathBuf::from),
            etcd_key: key.map(PathBuf::from),
        };
        assert!(args(None, None, None).client_config().unwrap().is_none());
        let err = args(Some("ca"), Some("c"), None)
            .client_config()
            .err()
            .unwrap();
        assert!(err.to_string().contains("go together"), "{err}");
        let folder = std::env::temp_dir().join(format!("caravan-etcd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let pem = folder.join("x.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let pem = pem.to_str().unwrap();
        let err = args(None, Some(pem), Some(pem))
            .client_config()
            .err()
            .unwrap();
        assert!(err.to_string().contains("needs --etcd-cacert"), "{err}");
        let err = args(Some("/nonexistent/ca.pem"), None, None)
            .client_config()
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("/nonexistent/ca.pem"),
            "{err:#}"
        );
        let not_pem = folder.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = args(not_pem.to_str(), None, None)
            .client_config()
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a PEM file"), "{err}");
        assert!(args(Some(pem), Some(pem), Some(pem))
            .client_config()
            .unwrap()
            .is_some());
        std::fs::remove_dir_all(&folder).unwrap();
    }

    #[test]
    fn schemes_follow_tls() {
        assert_eq!(
            with_scheme("http://10.0.0.1:50051", true),
            "https://10.0.0.1:50051"
        );
        assert_eq!(with_scheme("https://h:1", false), "http://h:1");
        assert_eq!(with_scheme("h:1", true), "https://h:1");
    }
}
