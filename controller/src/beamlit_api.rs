//! The Beamlit API client: registers the model of a `ModelDeployment` on Beamlit, keeps it up
//! to date, labels it while traffic is offloaded, and deletes it when the `ModelDeployment` goes.
//!
//! The API surface is the one the earlier Go controller used (see
//! `shared/reference/original-controller.md`):
//!
//! - token: OAuth2 client credentials (RFC 6749 §4.4), `POST {base}/oauth/token` with HTTP
//!   Basic authentication of the client id and secret, form `grant_type=client_credentials`;
//! - `PUT {base}/models/{model}` to update, `POST {base}/models` to create,
//!   `GET {base}/models/{model}?environment=`, `DELETE {base}/models/{model}?environment=`
//!   (404 = already gone);
//! - the `offloading` label, `"true"`/`"false"`, set on the model when offloading starts and
//!   stops, by reading the model and writing it back with the label changed (what the Go
//!   controller did, so fields the server added to the model are kept).
//!
//! Every request carries `Authorization: Bearer <token>` and `X-Beamlit-Workspace` (what
//! Beamlit's own SDKs send; a client-credentials token is already bound to a workspace, so the
//! header only makes the workspace explicit).
//!
//! The integration is optional: a controller without Beamlit credentials never builds a
//! [`BeamlitApi`], and offloading to an explicit `remoteBackend` works without it.
//!
//! Errors ([`ApiError`]) name the operation and the model, never contain the client secret or a
//! token, and tell whether retrying can help; [`Backoff`] spaces the retries.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::{Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// The public Beamlit API.
pub const DEFAULT_BASE_URL: &str = "https://api.beamlit.com/v0";
/// The label set to `"true"`/`"false"` on the model while traffic is (not) offloaded.
pub const LABEL_OFFLOADING: &str = "offloading";
/// Set to `"true"` when the `ModelDeployment` has offloading configured and enabled.
pub const LABEL_OFFLOADING_ENABLED: &str = "offloading-enabled";
/// Marks models this controller manages.
pub const LABEL_MANAGED_BY: &str = "managed-by";
/// The earlier controller's value, kept so that models it registered stay recognisable.
pub const MANAGED_BY: &str = "beamlit-operator";
/// Sent with every API request.
pub const WORKSPACE_HEADER: &str = "X-Beamlit-Workspace";

/// Error bodies are cut to this many bytes in messages (conditions and Events are short).
const MAX_ERROR_BODY: usize = 512;
/// When the token endpoint gives no `expires_in` (RFC 6749 §5.1 makes it optional), the token
/// is reused for this long; a 401 before then still triggers a refresh.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A value that must not be printed: `Debug` and `Display` show `***`. Read it with
/// [`Secret::expose`] where it is sent, and nowhere else.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How to reach the Beamlit API.
#[derive(Debug, Clone)]
pub struct BeamlitApiConfig {
    /// `https://api.beamlit.com/v0` ([`DEFAULT_BASE_URL`]); `{base}/oauth/token` and
    /// `{base}/models` are derived from it. http or https, without credentials, query or
    /// fragment.
    pub base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Sent as `X-Beamlit-Workspace`; empty sends no header.
    pub workspace: String,
    /// PEM file of CA certificates trusted in addition to the system's (private endpoints,
    /// tests).
    pub extra_ca_file: Option<PathBuf>,
    /// For a whole request, token request included.
    pub timeout: Duration,
    /// Honour `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment (reqwest's default).
    pub use_env_proxy: bool,
}

impl BeamlitApiConfig {
    /// The public API, no extra CA, a 30 s timeout, proxies from the environment.
    pub fn new(client_id: impl Into<String>, client_secret: Secret, workspace: &str) -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_string(),
            client_id: client_id.into(),
            client_secret,
            workspace: workspace.to_string(),
            extra_ca_file: None,
            timeout: Duration::from_secs(30),
            use_env_proxy: true,
        }
    }
}

/// The earlier chart's `beamlitApiToken`: base64 of `clientId:clientSecret`. The secret may
/// contain `:`, the id may not (as in HTTP Basic). Errors never show the value.
pub fn parse_api_token(token: &str) -> Result<(String, Secret), ApiError> {
    let bad = |why: &str| ApiError::Config(format!("the Beamlit API token {why}"));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| bad("is not base64"))?;
    let text = String::from_utf8(raw).map_err(|_| bad("is not UTF-8 once decoded"))?;
    match text.split_once(':') {
        Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok((id.to_string(), Secret::new(secret)))
        }
        _ => Err(bad("is not base64 of clientId:clientSecret")),
    }
}

/// What was being done, for messages and condition reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Get,
    Delete,
    SetOffloadingLabel,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Get => "read",
            Self::Delete => "delete",
            Self::SetOffloadingLabel => "set the offloading label of",
        })
    }
}

/// A failed Beamlit API call. Messages name the operation and the model; secrets and tokens
/// are never part of them (error bodies are cut and scrubbed of both).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The configuration cannot work (bad base URL, unreadable CA file, malformed API token).
    #[error("Beamlit API: {0}")]
    Config(String),
    /// No access token: the token endpoint refused (wrong client id or secret: `status`
    /// 400/401), failed, or was unreachable (`status` `None`).
    #[error("Beamlit API: cannot {op} model {model:?}: no access token from {url}: {reason}")]
    Token {
        op: Operation,
        model: String,
        url: String,
        status: Option<u16>,
        reason: String,
    },
    /// The API answered with an unexpected status.
    #[error("Beamlit API: cannot {op} model {model:?}: HTTP {status}: {body}")]
    Http {
        op: Operation,
        model: String,
        status: u16,
        body: String,
    },
    /// No answer: connection refused, TLS failure, timeout.
    #[error("Beamlit API: cannot {op} model {model:?}: {reason}")]
    Transport {
        op: Operation,
        model: String,
        reason: String,
    },
    /// An answer that is not what the API returns (e.g. a model that is not a JSON object).
    #[error("Beamlit API: cannot {op} model {model:?}: unexpected response: {reason}")]
    Decode {
        op: Operation,
        model: String,
        reason: String,
    },
}

impl ApiError {
    /// The HTTP status, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            Self::Token { status, .. } => *status,
            _ => None,
        }
    }

    /// Whether the same call may succeed later without a change of configuration: no
    /// answer, a 5xx, 408 or 429. A 4xx (bad credentials, a refused body) needs a change
    /// first; callers still retry those, at the backoff's cap.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Config(_) | Self::Decode { .. } => false,
            Self::Http { status, .. } => transient_status(*status),
            Self::Token { status, .. } => status.is_none_or(transient_status),
        }
    }

    /// A CamelCase reason for a status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) => "BeamlitConfigInvalid",
            Self::Token { .. } => "BeamlitTokenFailed",
            Self::Http { .. } => "BeamlitRequestFailed",
            Self::Transport { .. } => "BeamlitUnreachable",
            Self::Decode { .. } => "BeamlitBadResponse",
        }
    }
}

fn transient_status(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// The model as sent to Beamlit: the body of `POST /models` and `PUT /models/{name}`, with the
/// fields the earlier controller sent (`metadata {name, environment, labels}`, `spec {enabled,
/// runtime {servingPort, metricPort}, policies, serverlessConfig, podTemplate}`). Field names
/// are camelCase like the rest of the Beamlit API; optional parts are omitted when unset, but
/// `enabled` is always sent (the earlier controller lost `false` to `omitempty`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub metadata: ModelMetadata,
    pub spec: ModelSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// The `ModelDeployment`'s `model`.
    pub name: String,
    pub environment: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// Policy names (remote policies by name, local ones by their object's name).
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serverless_config: Option<ServerlessConfig>,
    /// The workload's pod template, as the Kubernetes JSON of a `PodTemplateSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<serde_json::Value>,
}

/// Where the model listens inside its pods.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runtime {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_port: Option<i32>,
}

/// The `ModelDeployment`'s `serverlessConfig`, passed through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerlessConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_num_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_minimum: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pod_retention_period: Option<String>,
}

impl Model {
    /// A model with the labels every managed model carries: `managed-by`, and
    /// `offloading-enabled: "true"` when `offloading_enabled`.
    pub fn new(name: &str, environment: &str, enabled: bool, offloading_enabled: bool) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string());
        if offloading_enabled {
            labels.insert(LABEL_OFFLOADING_ENABLED.to_string(), "true".to_string());
        }
        Self {
            metadata: ModelMetadata {
                name: name.to_string(),
                environment: environment.to_string(),
                labels,
            },
            spec: ModelSpec {
                enabled,
                ..ModelSpec::default()
            },
        }
    }

    /// Sets the `offloading` label. [`BeamlitApi::upsert_model`] replaces the whole model, so
    /// a caller that knows the current state includes it here rather than losing the label
    /// [`BeamlitApi::set_offloading_label`] set.
    pub fn with_offloading(mut self, offloading: bool) -> Self {
        self.metadata
            .labels
            .insert(LABEL_OFFLOADING.to_string(), offloading.to_string());
        self
    }
}

/// Exponential backoff for retrying failed API calls: `initial`, doubling per failure, capped
/// at `max`. Pure, so the reconcile loop can store the failure count (e.g. in status) and
/// compute the next delay from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s, ... up to 5 min: quick after a blip, gentle on a long outage.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay before the next try after `failures` consecutive failures (0: no delay).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        // 2^31 overflows any Duration product long before; saturate and cap instead.
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }
}

/// A cached access token.
#[derive(Clone)]
struct CachedToken {
    value: Secret,
    /// A tenth of the lifetime before expiry: requests in flight then still carry a valid
    /// token, despite clock skew and latency.
    refresh_at: Instant,
}

/// Tokens are used at most this long, whatever `expires_in` says: a remote's answer of
/// `u64::MAX` seconds would otherwise overflow `Instant + Duration` (a panic).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// When a token obtained at `obtained` with `expires_in` seconds of life should be replaced.
fn refresh_at(obtained: Instant, expires_in: Option<u64>) -> Instant {
    let lifetime = expires_in
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
        .min(MAX_TOKEN_LIFETIME);
    obtained + lifetime - lifetime / 10
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// RFC 6749 §5.2 error response.
#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// The Beamlit API client. Cheap to share (`Arc`); one token is cached for all calls.
pub struct BeamlitApi {
    http: reqwest::Client,
    /// `{base}/`, so [`Url::join`] and path segments append below it.
    base: Url,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    workspace: String,
    /// Held across a refresh, so one token request is in flight at a time and concurrent
    /// callers wait for its result instead of each asking for a token.
    token: Mutex<Option<CachedToken>>,
}

impl fmt::Debug for BeamlitApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeamlitApi")
            .field("base", &self.base.as_str())
            .field("client_id", &self.client_id)
            .field("workspace", &self.workspace)
            .finish_non_exhaustive()
    }
}

impl BeamlitApi {
    /// Validates the configuration and builds the HTTP client; makes no request.
    pub fn new(config: BeamlitApiConfig) -> Result<Self, ApiError> {
        let base = parse_base_url(&config.base_url)?;
        let token_url = base
            .join("oauth/token")
            .map_err(|e| ApiError::Config(format!("token URL below {base}: {e}")))?;
        if config.client_id.is_empty() {
            return Err(ApiError::Config("the client id is empty".into()));
        }
        if config.client_id.contains(':') {
            // HTTP Basic cannot carry it (RFC 7617 §2).
            return Err(ApiError::Config("the client id contains ':'".into()));
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            // The API does not redirect; following one could send the bearer token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("beamlit-controller/", env!("CARGO_PKG_VERSION")));
        if !config.use_env_proxy {
            builder = builder.no_proxy();
        }
        if let Some(path) = &config.extra_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ApiError::Config(format!("reading the CA file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ApiError::Config(format!("parsing the CA file {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(ApiError::Config(format!(
                    "the CA file {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| ApiError::Config(format!("building the HTTP client: {}", chain(&e))))?;
        Ok(Self {
            http,
            base,
            token_url,
            client_id: config.client_id,
            client_secret: config.client_secret,
            workspace: config.workspace,
            token: Mutex::new(None),
        })
    }

    /// Creates or replaces the model: `PUT /models/{name}`, and `POST /models` when the PUT
    /// says 404 (one request when the model exists, the usual case after the first
    /// reconcile). A 409 from the POST (created concurrently) is followed by one more PUT.
    pub async fn upsert_model(&self, model: &Model) -> Result<(), ApiError> {
        let name = &model.metadata.name;
        let put = || async {
            let url = self.model_url(Operation::Update, name, None)?;
            self.send(Operation::Update, name, Method::PUT, url, Some(model))
                .await
        };
        let resp = put().await?;
        if resp.status() != StatusCode::NOT_FOUND {
            return self.expect_success(Operation::Update, name, resp).await;
        }
        let url = self.models_url(Operation::Create, name)?;
        let resp = self
            .send(Operation::Create, name, Method::POST, url, Some(model))
            .await?;
        if resp.status() == StatusCode::CONFLICT {
            let resp = put().await?;
            return self.expect_success(Operation::Update, name, resp).await;
        }
        self.expect_success(Operation::Create, name, resp).await
    }

    /// The model as Beamlit has it (`GET /models/{name}?environment=`); `None` if it has none.
    pub async fn get_model(
        &self,
        name: &str,
        environment: &str,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        self.get_model_as(Operation::Get, name, environment).await
    }

    /// `DELETE /models/{name}?environment=`; a 404 means already gone, which is success.
    pub async fn delete_model(&self, name: &str, environment: &str) -> Result<(), ApiError> {
        let op = Operation::Delete;
        let url = self.model_url(op, name, Some(environment))?;
        let resp = self
            .send(op, name, Method::DELETE, url, None::<&()>)
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.expect_success(op, name, resp).await
    }

    /// Sets the model's `offloading` label to `"true"`/`"false"`: reads the model and writes it
    /// back with the label changed (no write when it already has that value). The model must
    /// exist ([`Self::upsert_model`] first): a missing one is an [`ApiError::Http`] 404.
    pub async fn set_offloading_label(
        &self,
        name: &str,
        environment: &str,
        offloading: bool,
    ) -> Result<(), ApiError> {
        let op = Operation::SetOffloadingLabel;
        let Some(mut current) = self.get_model_as(op, name, environment).await? else {
            return Err(ApiError::Http {
                op,
                model: name.to_string(),
                status: StatusCode::NOT_FOUND.as_u16(),
                body: "the model is not registered on Beamlit".to_string(),
            });
        };
        let changed =
            set_label(&mut current, LABEL_OFFLOADING, &offloading.to_string()).map_err(|why| {
                ApiError::Decode {
                    op,
                    model: name.to_string(),
                    reason: why.to_string(),
                }
            })?;
        if !changed {
            return Ok(());
        }
        let url = self.model_url(op, name, None)?;
        let resp = self
            .send(op, name, Method::PUT, url, Some(&current))
            .await?;
        self.expect_success(op, name, resp).await
    }

    async fn get_model_as(
        &self,
        op: Operation,
        name: &str,
        environment: &str,
    ) -> Result<Option<serde_json::Value>, ApiError> {
        let url = self.model_url(op, name, Some(environment))?;
        let resp = self.send(op, name, Method::GET, url, None::<&()>).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.http_error(op, name, resp).await);
        }
        let value: serde_json::Value = resp.json().await.map_err(|e| ApiError::Decode {
            op,
            model: name.to_string(),
            reason: chain(&e),
        })?;
        if !value.is_object() {
            return Err(ApiError::Decode {
                op,
                model: name.to_string(),
                reason: "the model is not a JSON object".to_string(),
            });
        }
        Ok(Some(value))
    }

    /// `{base}/models`.
    fn models_url(&self, op: Operation, model: &str) -> Result<Url, ApiError> {
        self.url_with_segments(op, model, &["models"])
    }

    /// `{base}/models/{name}`, the name as one path segment (percent-encoded), with
    /// `?environment=` when given.
    fn model_url(
        &self,
        op: Operation,
        name: &str,
        environment: Option<&str>,
    ) -> Result<Url, ApiError> {
        let mut url = self.url_with_segments(op, name, &["models", name])?;
        if let Some(env) = environment {
            url.query_pairs_mut().append_pair("environment", env);
        }
        Ok(url)
    }

    fn url_with_segments(
        &self,
        op: Operation,
        model: &str,
        segments: &[&str],
    ) -> Result<Url, ApiError> {
        model_path(&self.base, segments).ok_or_else(|| ApiError::Decode {
            op,
            model: model.to_string(),
            reason: format!("{} cannot take a path", self.base),
        })
    }

    /// Sends with the cached token; on a 401, drops that token and retries once with a fresh
    /// one (the token may have been revoked, or the server restarted and forgot it).
    async fn send<B: Serialize + ?Sized>(
        &self,
        op: Operation,
        model: &str,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ApiError> {
        let mut retried = false;
        loop {
            let token = self.token(op, model).await?;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.expose())
                .header(reqwest::header::ACCEPT, "application/json");
            if !self.workspace.is_empty() {
                req = req.header(WORKSPACE_HEADER, &self.workspace);
            }
            if let Some(body) = body {
                req = req.json(body);
            }
            let resp = req.send().await.map_err(|e| ApiError::Transport {
                op,
                model: model.to_string(),
                reason: chain(&e),
            })?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried {
                tracing::debug!(%op, model, "Beamlit API answered 401; refreshing the token");
                self.forget_token(&token).await;
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The cached token, or a fresh one when it is due for refresh.
    async fn token(&self, op: Operation, model: &str) -> Result<Secret, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch_token(op, model).await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops `used` unless another caller already replaced it.
    async fn forget_token(&self, used: &Secret) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| &t.value == used) {
            *cached = None;
        }
    }

    async fn fetch_token(&self, op: Operation, model: &str) -> Result<CachedToken, ApiError> {
        let fail = |status: Option<u16>, reason: String| ApiError::Token {
            op,
            model: model.to_string(),
            url: self.token_url.to_string(),
            status,
            reason,
        };
        // RFC 6749 §2.3.1: id and secret are form-encoded before Basic encoding (what Go's
        // oauth2 package, used by the earlier controller, does too).
        let id: String = form_urlencoded::byte_serialize(self.client_id.as_bytes()).collect();
        let secret: String =
            form_urlencoded::byte_serialize(self.client_secret.expose().as_bytes()).collect();
        let obtained = Instant::now();
        let resp = self
            .http
            .post(self.token_url.clone())
            .basic_auth(id, Some(secret))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| fail(None, chain(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| fail(Some(status.as_u16()), chain(&e)))?;
        if !status.is_success() {
            let why = match serde_json::from_str::<OAuthError>(&text) {
                Ok(e) => match e.error_description {
                    Some(d) => format!("{}: {d}", e.error),
                    None => e.error,
                },
                Err(_) => text,
            };
            let why = self.scrub(&why, None);
            return Err(fail(Some(status.as_u16()), format!("HTTP {status}: {why}")));
        }
        let parsed: TokenResponse = serde_json::from_str(&text).map_err(|e| {
            // Not the body: a 200 from a token endpoint may well hold a token.
            fail(Some(status.as_u16()), format!("not a token response: {e}"))
        })?;
        if let Some(kind) = &parsed.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(fail(
                Some(status.as_u16()),
                format!("token type {kind:?}, expected Bearer"),
            ));
        }
        if parsed.access_token.is_empty() {
            return Err(fail(Some(status.as_u16()), "empty access token".into()));
        }
        tracing::debug!(expires_in = ?parsed.expires_in, "got a Beamlit API token");
        Ok(CachedToken {
            value: Secret::new(parsed.access_token),
            refresh_at: refresh_at(obtained, parsed.expires_in),
        })
    }

    /// `Ok` for a 2xx, else [`ApiError::Http`] with the (cut, scrubbed) body.
    async fn expect_success(
        &self,
        op: Operation,
        model: &str,
        resp: reqwest::Response,
    ) -> Result<(), ApiError> {
        if resp.status().is_success() {
            return Ok(());
        }
        Err(self.http_error(op, model, resp).await)
    }

    async fn http_error(&self, op: Operation, model: &str, resp: reqwest::Response) -> ApiError {
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let token = self.token.lock().await.as_ref().map(|t| t.value.clone());
        ApiError::Http {
            op,
            model: model.to_string(),
            status,
            body: self.scrub(&body, token.as_ref()),
        }
    }

    /// Error bodies go into conditions and Events: cut them, and remove the secret and the
    /// token in case a server echoes the request.
    fn scrub(&self, text: &str, token: Option<&Secret>) -> String {
        let secrets: Vec<&str> = std::iter::once(self.client_secret.expose())
            .chain(token.map(Secret::expose))
            .collect();
        scrub(text, &secrets)
    }
}

/// Validates the base URL and gives it a trailing `/`, so joins stay below its path.
fn parse_base_url(raw: &str) -> Result<Url, ApiError> {
    let bad = |why: &str| ApiError::Config(format!("base URL {raw:?} {why}"));
    let mut url = Url::parse(raw.trim()).map_err(|e| bad(&format!("is invalid: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("is not http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    // Credentials in the URL would end up in error messages (reqwest puts URLs there).
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::Config(
            "the base URL must not carry credentials".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("has a query or fragment"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// `base` (ending in `/`) with `segments` appended, each percent-encoded as one segment.
fn model_path(base: &Url, segments: &[&str]) -> Option<Url> {
    let mut url = base.clone();
    {
        let mut path = url.path_segments_mut().ok()?;
        path.pop_if_empty();
        path.extend(segments);
    }
    Some(url)
}

/// Sets `metadata.labels[key] = value` in a model's JSON; whether anything changed.
fn set_label(model: &mut serde_json::Value, key: &str, value: &str) -> Result<bool, &'static str> {
    let metadata = model
        .as_object_mut()
        .ok_or("the model is not a JSON object")?
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}));
    let metadata = metadata
        .as_object_mut()
        .ok_or("the model's metadata is not a JSON object")?;
    let labels = metadata
        .entry("labels")
        .or_insert_with(|| serde_json::json!({}));
    if labels.is_null() {
        *labels = serde_json::json!({});
    }
    let labels = labels
        .as_object_mut()
        .ok_or("the model's labels are not a JSON object")?;
    if labels.get(key).and_then(serde_json::Value::as_str) == Some(value) {
        return Ok(false);
    }
    labels.insert(key.to_string(), serde_json::Value::from(value));
    Ok(true)
}

/// `text` with every non-empty `secrets` replaced and cut to [`MAX_ERROR_BODY`] bytes.
fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.trim().to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, "[redacted]");
    }
    if out.len() > MAX_ERROR_BODY {
        let mut end = MAX_ERROR_BODY;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    if out.is_empty() {
        out.push_str("(empty body)");
    }
    out
}

/// An error and its sources, `: `-separated (reqwest's own message hides the cause, e.g. the
/// certificate problem, in its source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let config = BeamlitApiConfig::new("id", s.clone(), "ws");
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(10),
        };
        let table = [
            (0, 0),
            (1, 500),
            (2, 1_000),
            (3, 2_000),
            (4, 4_000),
            (5, 8_000),
            (6, 10_000),
            (7, 10_000),
            (32, 10_000),
            (u32::MAX, 10_000),
        ];
        for (failures, ms) in table {
            assert_eq!(
                b.delay(failures),
                Duration::from_millis(ms),
                "after {failures} failures"
            );
        }
        let d = Backoff::default();
        assert_eq!(d.delay(1), Duration::from_secs(1));
        assert_eq!(d.delay(9), Duration::from_secs(256));
        assert_eq!(d.delay(10), Duration::from_secs(300));
    }

    #[test]
    fn base_urls_and_model_paths() {
        let table = [
            ("https://api.beamlit.com/v0", "https://api.beamlit.com/v0/"),
            ("https://api.beamlit.com/v0/", "https://api.beamlit.com/v0/"),
            ("http://10.0.0.1:8080", "http://10.0.0.1:8080/"),
        ];
        for (raw, want) in table {
            let base = parse_base_url(raw).expect(raw);
            assert_eq!(base.as_str(), want);
            assert_eq!(
                base.join("oauth/token").expect("join").path(),
                format!("{}oauth/token", base.path())
            );
        }
        for bad in [
            "ftp://x/",
            "https://user:pw@api.beamlit.com/v0",
            "https://api.beamlit.com/v0?x=1",
            "not a url",
            "unix:/run/x",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad} accepted");
        }
        let err = parse_base_url("https://user:pw@h/")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| !e.contains("pw")));

        let base = parse_base_url("https://api.beamlit.com/v0").expect("base");
        let url = model_path(&base, &["models", "llama 3/8b"]).expect("path");
        assert_eq!(
            url.as_str(),
            "https://api.beamlit.com/v0/models/llama%203%2F8b"
        );
        let url = model_path(&base, &["models"]).expect("path");
        assert_eq!(url.as_str(), "https://api.beamlit.com/v0/models");
    }

    #[test]
    fn model_body_keeps_enabled_false_and_omits_unset_parts() {
        let mut m = Model::new("llama", "production", false, true).with_offloading(true);
        m.spec.policies = vec!["eu-only".into()];
        m.spec.runtime = Some(Runtime {
            serving_port: Some(8080),
            metric_port: None,
        });
        m.spec.serverless_config = Some(ServerlessConfig {
            min_num_replicas: Some(0),
            scale_down_delay: Some("5m".into()),
            ..ServerlessConfig::default()
        });
        let v = serde_json::to_value(&m).expect("serialize");
        assert_eq!(
            v,
            serde_json::json!({
                "metadata": {
                    "name": "llama",
                    "environment": "production",
                    "labels": {
                        "managed-by": "beamlit-operator",
                        "offloading": "true",
                        "offloading-enabled": "true"
                    }
                },
                "spec": {
                    "enabled": false,
                    "runtime": {"servingPort": 8080},
                    "policies": ["eu-only"],
                    "serverlessConfig": {"minNumReplicas": 0, "scaleDownDelay": "5m"}
                }
            })
        );
        let back: Model = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, m);
        let plain = Model::new("m", "dev", true, false);
        assert!(!plain.metadata.labels.contains_key(LABEL_OFFLOADING_ENABLED));
    }

    #[test]
    fn labels_are_set_in_place_keeping_other_fields() {
        let mut v = serde_json::json!({
            "metadata": {"name": "m", "labels": {"a": "b"}},
            "spec": {"enabled": true},
            "status": "DEPLOYED"
        });
        assert_eq!(set_label(&mut v, "offloading", "true"), Ok(true));
        assert_eq!(set_label(&mut v, "offloading", "true"), Ok(false));
        assert_eq!(v["metadata"]["labels"]["a"], "b");
        assert_eq!(v["metadata"]["labels"]["offloading"], "true");
        assert_eq!(v["status"], "DEPLOYED");

        let mut no_labels = serde_json::json!({"metadata": {"name": "m", "labels": null}});
        assert_eq!(set_label(&mut no_labels, "offloading", "false"), Ok(true));
        assert_eq!(no_labels["metadata"]["labels"]["offloading"], "false");
        let mut no_metadata = serde_json::json!({});
        assert_eq!(set_label(&mut no_metadata, "k", "v"), Ok(true));
        assert!(set_label(&mut serde_json::json!([]), "k", "v").is_err());
        assert!(set_label(&mut serde_json::json!({"metadata": 1}), "k", "v").is_err());
    }

    #[test]
    fn scrub_removes_secrets_and_cuts() {
        assert_eq!(
            scrub("bad secret s3cr3t and tok-1", &["s3cr3t", "tok-1", ""]),
            "bad secret [redacted] and [redacted]"
        );
        assert_eq!(scrub("  ", &[]), "(empty body)");
        let long = "é".repeat(400);
        let cut = scrub(&long, &[]);
        assert!(cut.len() <= MAX_ERROR_BODY + 3 && cut.ends_with("..."));
    }

    #[test]
    fn token_refreshes_a_tenth_of_its_lifetime_early() {
        let t0 = Instant::now();
        assert_eq!(refresh_at(t0, Some(3600)), t0 + Duration::from_secs(3240));
        assert_eq!(refresh_at(t0, Some(10)), t0 + Duration::from_secs(9));
        assert_eq!(refresh_at(t0, Some(0)), t0);
        assert_eq!(refresh_at(t0, None), t0 + Duration::from_secs(54));
    }

    #[test]
    fn a_huge_expires_in_from_the_token_endpoint_does_not_panic() {
        let t0 = Instant::now();
        for huge in [u64::MAX, u64::MAX / 2, 1 << 40] {
            let lifetime = MAX_TOKEN_LIFETIME;
            assert_eq!(
                refresh_at(t0, Some(huge)),
                t0 + lifetime - lifetime / 10,
                "{huge}"
            );
        }
    }

    #[test]
    fn api_tokens_decode_to_id_and_secret() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("my-id:se:cret");
        let (id, secret) = parse_api_token(&b64).expect("valid");
        assert_eq!((id.as_str(), secret.expose()), ("my-id", "se:cret"));
        let no_colon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        for bad in ["%%%", no_colon.as_str(), ""] {
            let err = parse_api_token(bad).err().map(|e| e.to_string());
            assert!(err.is_some_and(|e| !e.contains("nocolon")), "{bad}");
        }
    }

    #[test]
    fn errors_name_operation_and_model_and_classify() {
        let http = ApiError::Http {
            op: Operation::Create,
            model: "llama".into(),
            status: 500,
            body: "boom".into(),
        };
        assert_eq!(
            http.to_string(),
            "Beamlit API: cannot create model \"llama\": HTTP 500: boom"
        );
        assert!(http.is_transient());
        assert_eq!(
            (http.status(), http.reason()),
            (Some(500), "BeamlitRequestFailed")
        );
        let refused = ApiError::Token {
            op: Operation::SetOffloadingLabel,
            model: "llama".into(),
            url: "https://h/v0/oauth/token".into(),
            status: Some(401),
            reason: "HTTP 401 Unauthorized: invalid_client".into(),
        };
        assert!(
            refused
                .to_string()
                .starts_with("Beamlit API: cannot set the offloading label of model \"llama\"")
        );
        assert!(!refused.is_transient());
        let unreachable = ApiError::Token {
            op: Operation::Get,
            model: "llama".into(),
            url: "https://h/v0/oauth/token".into(),
            status: None,
            reason: "connection refused".into(),
        };
        assert!(unreachable.is_transient());
        for (status, transient) in [
            (400, false),
            (403, false),
            (408, true),
            (429, true),
            (503, true),
        ] {
            assert_eq!(transient_status(status), transient, "{status}");
        }
    }

    #[test]
    fn new_validates_without_network() {
        let mut c = BeamlitApiConfig::new("id", Secret::new("s"), "ws");
        assert!(BeamlitApi::new(c.clone()).is_ok());
        c.extra_ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let err = BeamlitApi::new(c.clone()).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("/nonexistent/ca.pem")));
        c.extra_ca_file = None;
        c.client_id = "a:b".into();
        assert!(BeamlitApi::new(c).is_err());
    }
}
