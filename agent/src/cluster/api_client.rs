//! The agent's own Kubernetes API client, whose sockets carry the bypass mark: the node's eBPF
//! programs never redirect them, whatever the `services` map says. An entry for the API
//! server's address (written by hand, or by a bug) cannot cut the agent off from the API server
//! that would carry the fix. kube's default client has no way to set a socket option, so this is
//! its stack (base URI, auth, extra headers over hyper's pooled client with rustls) over a
//! connector that marks its sockets.
use anyhow::Context as _;
use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioExecutor};
use kube::{Client, Config, client::ConfigExt as _};
use tower::{BoxError, ServiceBuilder};

/// A client for `config` whose every connection has SO_MARK `mark` (needs CAP_NET_ADMIN).
pub fn marked_client(config: Config, mark: u32) -> anyhow::Result<Client> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_mark(Some(mark));
    http.set_connect_timeout(config.connect_timeout);
    http.set_nodelay(true);
    let https = config
        .rustls_https_connector_with_connector(http)
        .context("TLS for the Kubernetes API")?;
    let pool: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().context("Kubernetes API credentials")?)
        .layer(
            config
                .extra_headers_layer()
                .context("Kubernetes API headers")?,
        )
        .map_err(BoxError::from)
        .service(pool);
    Ok(Client::new(service, config.default_namespace))
}

/// The in-cluster service account or `KUBECONFIG`, as `kube::Client::try_default` finds them.
pub async fn infer(mark: u32) -> anyhow::Result<Client> {
    let config = Config::infer()
        .await
        .context("finding the Kubernetes API (in-cluster service account or KUBECONFIG)")?;
    marked_client(config, mark)
}
