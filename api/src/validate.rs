//! The field rules of a ModelDeployment, in one place. Each rule is a pattern (or a bound) and
//! the message that explains it. The CRD carries them as CEL rules (see
//! [`crate::model_deployment`]), so that `kubectl apply` refuses bad input naming the field; the
//! controller checks the same rules in Rust as a backstop (a CRD installed by hand, an older
//! schema), and the agents use the same messages when they refuse what a status holds. The
//! patterns are RE2 syntax as CEL's `matches` takes it, and the regex crate reads them the same.
use std::sync::LazyLock;

use regex::Regex;

/// Model and environment names: they are substituted into URL paths (`$model`) and sent to
/// Beamlit, so they are bounded and made of URL-safe characters only.
pub const NAME_MAX: usize = 63;
pub const NAME_PATTERN: &str = "^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$";
pub const NAME_MESSAGE: &str = "must be 1 to 63 characters: letters, digits, `.`, `_` and `-`, \
                                starting and ending with a letter or digit";

/// `host[:port]`: a DNS name or IPv4 address, or an IPv6 address in brackets, and an optional
/// port. No scheme, path, credentials or spaces.
pub const HOST_MAX: usize = 261;
pub const HOST_PATTERN: &str = "^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?$";
pub const HOST_MESSAGE: &str = "must be host[:port] only (a DNS name, an IPv4 address or an IPv6 \
                                address in brackets, and an optional port), without scheme, \
                                path or spaces, e.g. run.beamlit.com or 10.0.0.9:8443";
pub const PORT_MESSAGE: &str = "the port must be from 1 to 65535";

/// Path prefixes: URL path characters only (so no query, fragment, space or control character)
/// and no `.`/`..` segments (also percent-encoded), which a remote would resolve out of the
/// prefix.
pub const PATH_MAX: usize = 1024;
pub const PATH_PATTERN: &str = "^[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$";
pub const PATH_MESSAGE: &str = "must be a URL path: letters, digits and -._~!$&'()*+,;=:@%/ only \
                                (no query `?`, fragment `#`, spaces or control characters)";
pub const DOT_SEGMENT_PATTERN: &str = "(^|/)(\\.|%2[eE]){1,2}(/|$)";
pub const DOT_SEGMENT_MESSAGE: &str = "must not contain `.` or `..` segments";

/// Header names are HTTP tokens (RFC 9110 5.6.2); values have no control characters but tab.
pub const HEADERS_MAX: usize = 32;
pub const HEADER_NAME_MAX: usize = 256;
pub const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";
pub const HEADER_NAME_MESSAGE: &str = "header names must be HTTP tokens: letters, digits and \
                                       !#$%&'*+-.^_`|~, no spaces or colons";
pub const HEADER_VALUE_MAX: usize = 4096;
pub const CONTROL_PATTERN: &str = "[\\x00-\\x08\\x0a-\\x1f\\x7f]";
pub const HEADER_VALUE_MESSAGE: &str = "header values must not contain control characters (line \
                                        breaks, NUL, ...); tab is allowed";

/// Token URLs: `http(s)://host[:port]/path`, no credentials, query or fragment. `https` is
/// required by the controller unless the cluster admin opted out (test backends).
pub const URL_MAX: usize = 2048;
pub const TOKEN_URL_PATTERN: &str = "^https?://([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?$";
pub const TOKEN_URL_MESSAGE: &str = "must be an http(s) URL, https://host[:port]/path, without \
                                     credentials, query or fragment";
pub const TOKEN_URL_HTTPS_MESSAGE: &str = "must be an https URL: the client secret is sent there \
                                           (plain http is allowed only when the cluster admin \
                                           sets the chart value \
                                           config.allowInsecureTokenUrls for test backends)";

/// Kubernetes object names: a Service or namespace is a DNS label, a Secret or workload a DNS
/// subdomain, a Secret key the ConfigMap/Secret key charset.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
pub const DNS_LABEL_MESSAGE: &str =
    "must be a DNS label: at most 63 lowercase letters, digits and `-`";
pub const DNS_SUBDOMAIN_MAX: usize = 253;
pub const DNS_SUBDOMAIN_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
pub const DNS_SUBDOMAIN_MESSAGE: &str =
    "must be a DNS subdomain: at most 253 lowercase letters, digits, `-` and `.`";
pub const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";
pub const SECRET_KEY_MESSAGE: &str = "must be at most 253 letters, digits, `-`, `_` and `.`";
pub const CLIENT_ID_MAX: usize = 256;
pub const CLIENT_ID_MESSAGE: &str = "must not contain control characters";

/// Metric targets.
pub const METRICS_MAX: usize = 16;
/// Quantities are short (`500m`, `1.5Gi`, `2e3`).
pub const QUANTITY_MAX: usize = 64;
pub const POSITIVE_MESSAGE: &str = "must be positive";
pub const QUANTITY_MESSAGE: &str = "must be a positive quantity, e.g. 10, 500m or 2k";

fn regex(pattern: &str) -> Regex {
    // The patterns are constants of this module, checked by the tests below.
    Regex::new(pattern).unwrap_or_else(|e| panic!("invalid built-in pattern {pattern}: {e}"))
}

static NAME: LazyLock<Regex> = LazyLock::new(|| regex(NAME_PATTERN));
static HOST: LazyLock<Regex> = LazyLock::new(|| regex(HOST_PATTERN));
static PATH: LazyLock<Regex> = LazyLock::new(|| regex(PATH_PATTERN));
static DOT_SEGMENT: LazyLock<Regex> = LazyLock::new(|| regex(DOT_SEGMENT_PATTERN));
static HEADER_NAME: LazyLock<Regex> = LazyLock::new(|| regex(HEADER_NAME_PATTERN));
static CONTROL: LazyLock<Regex> = LazyLock::new(|| regex(CONTROL_PATTERN));
static TOKEN_URL: LazyLock<Regex> = LazyLock::new(|| regex(TOKEN_URL_PATTERN));
static DNS_LABEL: LazyLock<Regex> = LazyLock::new(|| regex(DNS_LABEL_PATTERN));
static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| regex(DNS_SUBDOMAIN_PATTERN));
static SECRET_KEY: LazyLock<Regex> = LazyLock::new(|| regex(SECRET_KEY_PATTERN));

/// One refused field: `spec.offloadingConfig.remoteBackend.host: must be host[:port] ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

fn check(ok: bool, message: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(message.to_string()) }
}

pub fn name(value: &str) -> Result<(), String> {
    check(
        value.len() <= NAME_MAX && NAME.is_match(value),
        NAME_MESSAGE,
    )
}

pub fn host(value: &str) -> Result<(), String> {
    check(
        value.len() <= HOST_MAX && HOST.is_match(value),
        HOST_MESSAGE,
    )?;
    match port_of(value) {
        Some(port) => check((1..=65535).contains(&port), PORT_MESSAGE),
        None => Ok(()),
    }
}

/// The explicit port of a `host[:port]` that matched [`HOST_PATTERN`].
fn port_of(value: &str) -> Option<u32> {
    let (_, after) = value.rsplit_once(':')?;
    if after.contains(']') {
        return None; // `[fd00::9]`: the colons are the address's
    }
    after.parse().ok()
}

pub fn path_prefix(value: &str) -> Result<(), String> {
    check(
        value.len() <= PATH_MAX && PATH.is_match(value),
        PATH_MESSAGE,
    )?;
    check(!DOT_SEGMENT.is_match(value), DOT_SEGMENT_MESSAGE)
}

pub fn header_name(value: &str) -> Result<(), String> {
    check(
        value.len() <= HEADER_NAME_MAX && HEADER_NAME.is_match(value),
        HEADER_NAME_MESSAGE,
    )
}

pub fn header_value(value: &str) -> Result<(), String> {
    check(
        value.len() <= HEADER_VALUE_MAX && !CONTROL.is_match(value),
        HEADER_VALUE_MESSAGE,
    )
}

/// `allow_http`: the cluster admin's opt-out for test backends.
pub fn token_url(value: &str, allow_http: bool) -> Result<(), String> {
    check(
        value.len() <= URL_MAX && TOKEN_URL.is_match(value),
        TOKEN_URL_MESSAGE,
    )?;
    check(
        allow_http || value.starts_with("https://"),
        TOKEN_URL_HTTPS_MESSAGE,
    )
}

pub fn dns_label(value: &str) -> Result<(), String> {
    check(DNS_LABEL.is_match(value), DNS_LABEL_MESSAGE)
}

pub fn dns_subdomain(value: &str) -> Result<(), String> {
    check(
        value.len() <= DNS_SUBDOMAIN_MAX && DNS_SUBDOMAIN.is_match(value),
        DNS_SUBDOMAIN_MESSAGE,
    )
}

pub fn secret_key(value: &str) -> Result<(), String> {
    check(
        value.len() <= DNS_SUBDOMAIN_MAX && SECRET_KEY.is_match(value),
        SECRET_KEY_MESSAGE,
    )
}

pub fn client_id(value: &str) -> Result<(), String> {
    check(
        !value.is_empty() && value.len() <= CLIENT_ID_MAX && !CONTROL.is_match(value),
        CLIENT_ID_MESSAGE,
    )
}

/// The host part of `host[:port]` (brackets removed), lowercased, for comparing with the
/// allowed remote hosts.
pub fn host_without_port(value: &str) -> String {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        value.rsplit_once(':').map_or(value, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

/// Every rule above that a spec breaks (CEL refuses these at admission; this is the backstop),
/// each naming its field. `allow_http_token_urls` is the admin's opt-out.
pub fn spec(spec: &crate::ModelDeploymentSpec, allow_http_token_urls: bool) -> Vec<FieldError> {
    let mut errors = Vec::new();
    fn add(errors: &mut Vec<FieldError>, field: &str, result: Result<(), String>) {
        if let Err(message) = result {
            errors.push(FieldError {
                field: field.to_string(),
                message,
            });
        }
    }
    let mut push = |field: &str, result| add(&mut errors, field, result);
    push("spec.model", name(&spec.model));
    push("spec.environment", name(&spec.environment));
    push(
        "spec.modelSourceRef.name",
        dns_subdomain(&spec.model_source_ref.name),
    );
    if let Some(ns) = &spec.model_source_ref.namespace {
        push("spec.modelSourceRef.namespace", dns_label(ns));
    }
    if let Some(s) = &spec.service_ref {
        push("spec.serviceRef.name", dns_label(&s.name));
        if let Some(ns) = &s.namespace {
            push("spec.serviceRef.namespace", dns_label(ns));
        }
    }
    let Some(offloading) = &spec.offloading_config else {
        return errors;
    };
    if let Some(b) = &offloading.remote_backend {
        let field = "spec.offloadingConfig.remoteBackend";
        push(&format!("{field}.host"), host(&b.host));
        if let Some(p) = &b.path_prefix {
            push(&format!("{field}.pathPrefix"), path_prefix(p));
        }
        if b.headers_to_add.len() > HEADERS_MAX {
            push(
                &format!("{field}.headersToAdd"),
                Err(format!("at most {HEADERS_MAX} headers")),
            );
        }
        for (k, v) in &b.headers_to_add {
            push(&format!("{field}.headersToAdd"), header_name(k));
            push(&format!("{field}.headersToAdd[{k}]"), header_value(v));
        }
        if let Some(o) = b.auth_config.as_ref().and_then(|a| a.oauth_config.as_ref()) {
            let field = format!("{field}.authConfig.oauthConfig");
            push(&format!("{field}.clientId"), client_id(&o.client_id));
            if let Some(url) = &o.token_url {
                push(
                    &format!("{field}.tokenUrl"),
                    token_url(url, allow_http_token_urls),
                );
            }
            if let Some(r) = &o.client_secret_ref {
                push(
                    &format!("{field}.clientSecretRef.name"),
                    dns_subdomain(&r.name),
                );
                push(&format!("{field}.clientSecretRef.key"), secret_key(&r.key));
            }
        }
    }
    if offloading.metrics.len() > METRICS_MAX {
        push(
            "spec.offloadingConfig.metrics",
            Err(format!("at most {METRICS_MAX} metrics")),
        );
    }
    for (i, m) in offloading.metrics.iter().enumerate() {
        for (kind, target) in metric_targets(m) {
            let field = format!("spec.offloadingConfig.metrics[{i}].{kind}.target");
            if let Some(u) = target.average_utilization {
                push(
                    &format!("{field}.averageUtilization"),
                    check(u > 0, POSITIVE_MESSAGE),
                );
            }
            for (name, q) in [
                ("averageValue", &target.average_value),
                ("value", &target.value),
            ] {
                if let Some(q) = q {
                    push(
                        &format!("{field}.{name}"),
                        check(positive_quantity(&q.0), QUANTITY_MESSAGE),
                    );
                }
            }
        }
    }
    errors
}

/// The targets a metric carries, by the field they are under.
fn metric_targets(
    m: &k8s_openapi::api::autoscaling::v2::MetricSpec,
) -> Vec<(
    &'static str,
    &k8s_openapi::api::autoscaling::v2::MetricTarget,
)> {
    let mut out = Vec::new();
    if let Some(r) = &m.resource {
        out.push(("resource", &r.target));
    }
    if let Some(r) = &m.container_resource {
        out.push(("containerResource", &r.target));
    }
    if let Some(p) = &m.pods {
        out.push(("pods", &p.target));
    }
    if let Some(o) = &m.object {
        out.push(("object", &o.target));
    }
    if let Some(e) = &m.external {
        out.push(("external", &e.target));
    }
    out
}

/// A Kubernetes quantity (`<number><suffix>`, RFC: the apimachinery grammar) greater than 0.
pub fn positive_quantity(text: &str) -> bool {
    static QUANTITY: LazyLock<Regex> = LazyLock::new(|| {
        regex(
            "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?[0-9]+)?$",
        )
    });
    // `0e5`, `0.0k`: a zero mantissa is zero, whatever the exponent says.
    QUANTITY.is_match(text)
        && mantissa(text)
            .chars()
            .any(|c| c.is_ascii_digit() && c != '0')
}

fn mantissa(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles() {
        for p in [
            NAME_PATTERN,
            HOST_PATTERN,
            PATH_PATTERN,
            DOT_SEGMENT_PATTERN,
            HEADER_NAME_PATTERN,
            CONTROL_PATTERN,
            TOKEN_URL_PATTERN,
            DNS_LABEL_PATTERN,
            DNS_SUBDOMAIN_PATTERN,
            SECRET_KEY_PATTERN,
        ] {
            Regex::new(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn rules_table() {
        type Check = fn(&str) -> Result<(), String>;
        let long_name = "a".repeat(64);
        let cases: Vec<(&str, Check, &str, bool)> = vec![
            ("name", name, "php-apache", true),
            ("name", name, "Llama_3.1-8b", true),
            ("name", name, "", false),
            ("name", name, &long_name, false),
            ("name", name, "a/b", false),
            ("name", name, "-a", false),
            ("name", name, "a b", false),
            ("host", host, "run.beamlit.com", true),
            ("host", host, "10.0.0.9:8443", true),
            ("host", host, "[fd00::9]:443", true),
            ("host", host, "[fd00::9]", true),
            ("host", host, "https://run.beamlit.com", false),
            ("host", host, "run.beamlit.com/path", false),
            ("host", host, "user@run.beamlit.com", false),
            ("host", host, "run.beamlit.com:0", false),
            ("host", host, "run.beamlit.com:70000", false),
            ("host", host, "run beamlit", false),
            ("host", host, "", false),
            ("path", path_prefix, "/$workspace/models/$model", true),
            ("path", path_prefix, "", true),
            ("path", path_prefix, "v1/$model", true),
            ("path", path_prefix, "/a/../b", false),
            ("path", path_prefix, "/a/./b", false),
            ("path", path_prefix, "/..", false),
            ("path", path_prefix, "/a/%2e%2E/b", false),
            ("path", path_prefix, "/a?x=1", false),
            ("path", path_prefix, "/a#f", false),
            ("path", path_prefix, "/a b", false),
            ("path", path_prefix, "/a..b/.well-known", true),
            ("header", header_name, "X-Beamlit-Environment", true),
            ("header", header_name, "X Bad", false),
            ("header", header_name, "X:Bad", false),
            ("header", header_name, "", false),
            ("value", header_value, "production\tok", true),
            ("value", header_value, "a\r\nInjected: 1", false),
            ("value", header_value, "nul\0", false),
            ("label", dns_label, "php-apache", true),
            ("label", dns_label, "Php", false),
            ("subdomain", dns_subdomain, "beamlit.credentials", true),
            ("key", secret_key, "clientSecret", true),
            ("key", secret_key, "a/b", false),
        ];
        for (what, f, input, ok) in cases {
            assert_eq!(f(input).is_ok(), ok, "{what} {input:?}: {:?}", f(input));
        }
    }

    #[test]
    fn token_urls() {
        assert!(token_url("https://api.beamlit.com/v0/oauth/token", false).is_ok());
        assert!(token_url("https://10.0.0.9:8443/oauth/token", false).is_ok());
        let http = token_url("http://10.0.0.9/oauth/token", false).expect_err("http");
        assert!(http.contains("config.allowInsecureTokenUrls"), "{http}");
        assert!(token_url("http://10.0.0.9/oauth/token", true).is_ok());
        for bad in [
            "ftp://x/y",
            "https://user:pw@x/y",
            "https://x/y?q=1",
            "https://x/y#f",
            "https://x y/",
            "x/y",
        ] {
            assert!(token_url(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        for (q, ok) in [
            ("10", true),
            ("500m", true),
            ("2k", true),
            ("1.5Gi", true),
            ("1e3", true),
            ("250000000n", true),
            ("1500u", true),
            ("0", false),
            ("0.0", false),
            ("0e5", false),
            ("-1", false),
            ("ten", false),
            ("", false),
            ("1 k", false),
        ] {
            assert_eq!(positive_quantity(q), ok, "{q}");
        }
    }

    #[test]
    fn hosts_compare_without_port_and_case() {
        assert_eq!(host_without_port("Run.Beamlit.com:443"), "run.beamlit.com");
        assert_eq!(host_without_port("[FD00::9]:443"), "fd00::9");
        assert_eq!(host_without_port("10.0.0.9"), "10.0.0.9");
    }
}
