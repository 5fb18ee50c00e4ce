//! Auth layer: the `Authorization` header for a backend. OAuth2 client-credentials tokens are
//! cached until shortly before they expire, and at most one refresh is in flight per client:
//! concurrent requests wait for it instead of each asking for a token.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::Mutex;

use super::{
    backend::{Auth, OAuthClient},
    client::{self, HttpClient},
    metrics::Metrics,
};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("token endpoint {url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("token endpoint {url} answered without a usable access_token: {reason}")]
    Response { url: String, reason: String },
}

#[derive(Clone)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// One per OAuth client (token URL + client id), shared by the services that use it.
pub struct TokenCache {
    oauth: OAuthClient,
    http: HttpClient,
    timeout: Duration,
    current: Mutex<Option<Token>>,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    pub fn new(
        oauth: OAuthClient,
        http: HttpClient,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            oauth,
            http,
            timeout,
            current: Mutex::new(None),
            metrics,
        }
    }

    pub fn client(&self) -> &OAuthClient {
        &self.oauth
    }

    /// A valid access token, fetched only when the cached one is missing or about to expire.
    pub async fn token(&self) -> Result<String, AuthError> {
        // The lock is held across the fetch on purpose: it is what keeps one refresh in flight.
        let mut current = self.current.lock().await;
        if let Some(token) = current.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.value.clone());
        }
        let result = self.fetch().await;
        self.metrics.token_refresh(result.is_ok());
        let token = result?;
        let value = token.value.clone();
        *current = Some(token);
        Ok(value)
    }

    async fn fetch(&self) -> Result<Token, AuthError> {
        let url = self.oauth.token_url.to_string();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            self.oauth.client_id,
            self.oauth.client_secret.expose()
        ));
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.oauth.token_url.clone())
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(client::full("grant_type=client_credentials"))
            .map_err(|e| AuthError::Request {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let issued = Instant::now();
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| AuthError::Request {
                    url: url.clone(),
                    reason: client::root_cause(&e),
                })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| AuthError::Request {
                    url: url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, AuthError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AuthError::Request {
                url: url.clone(),
                reason: format!("no answer within {:?}", self.timeout),
            })??;
        if !status.is_success() {
            return Err(AuthError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| AuthError::Response {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if parsed.access_token.is_empty() {
            return Err(AuthError::Response {
                url,
                reason: "empty access_token".into(),
            });
        }
        Ok(Token {
            value: parsed.access_token,
            refresh_at: refresh_at(issued, parsed.expires_in),
        })
    }
}

/// Tokens are used at most this long, whatever `expires_in` says: a remote's answer of
/// `u64::MAX` seconds would otherwise overflow `Instant + Duration` (a panic).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// When a token issued at `issued` with `expires_in` seconds of life should be replaced: a
/// little before expiry, by a tenth of the lifetime (at most a minute).
fn refresh_at(issued: Instant, expires_in: Option<u64>) -> Instant {
    let lifetime = Duration::from_secs(expires_in.unwrap_or(300)).min(MAX_TOKEN_LIFETIME);
    let margin = (lifetime / 10).min(Duration::from_secs(60));
    issued + lifetime - margin
}

/// The header value for a backend's auth, if any.
pub async fn authorization(
    auth: &Auth,
    tokens: Option<&TokenCache>,
) -> Result<Option<String>, AuthError> {
    match (auth, tokens) {
        (Auth::None, _) => Ok(None),
        (Auth::Bearer(token), _) => Ok(Some(format!("Bearer {}", token.expose()))),
        (Auth::OAuth(_), Some(cache)) => Ok(Some(format!("Bearer {}", cache.token().await?))),
        (Auth::OAuth(oauth), None) => Err(AuthError::Request {
            url: oauth.token_url.to_string(),
            reason: "no token cache for this client (internal error)".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_refresh_a_tenth_of_their_lifetime_early_at_most_a_minute() {
        let t0 = Instant::now();
        assert_eq!(refresh_at(t0, Some(100)), t0 + Duration::from_secs(90));
        assert_eq!(refresh_at(t0, Some(3600)), t0 + Duration::from_secs(3540));
        assert_eq!(refresh_at(t0, Some(0)), t0);
        assert_eq!(refresh_at(t0, None), t0 + Duration::from_secs(270));
    }

    #[test]
    fn a_huge_expires_in_from_the_token_endpoint_does_not_panic() {
        let t0 = Instant::now();
        for huge in [u64::MAX, u64::MAX / 2, 1 << 40] {
            let at = refresh_at(t0, Some(huge));
            assert_eq!(
                at,
                t0 + MAX_TOKEN_LIFETIME - Duration::from_secs(60),
                "{huge}"
            );
        }
    }
}
