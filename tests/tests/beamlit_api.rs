//! Privileged tests of the controller's Beamlit API client
//! (`beamlit_controller::beamlit_api`) against the fake Beamlit over HTTPS with
//! the test CA. The fake runs in a "remote" pod of a [`Topology`]; the client
//! runs on a thread that joined the "client" pod's namespace, with its own
//! current-thread tokio runtime, so nothing is sent from the host namespace.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use beamlit_controller::beamlit_api::{
    ApiError, BeamlitApi, BeamlitApiConfig, Model, Operation, Runtime, Secret,
};
use beamlit_testbed::{
    FakeBeamlit, FakeBeamlitOptions, Netns, Pod, Topology, require_privileges, spawn,
};

const HTTPS_PORT: u16 = 8443;
const CLIENT_ID: &str = "controller-test";
/// Distinctive, so a leak into an error message cannot be missed.
const CLIENT_SECRET: &str = "s3cret-beamlit-api-7f3a";
const MODEL: &str = "llama";
const ENV: &str = "production";

/// A client pod and the fake in a remote pod; the topology must outlive both.
fn bed(hint: &str, models_fail_status: Option<u16>) -> Result<(Topology, Pod, FakeBeamlit)> {
    let mut topo = Topology::new(hint)?;
    let client = topo.add_pod("client")?;
    let remote = topo.add_pod("remote")?;
    let fake = FakeBeamlit::start(
        &remote.netns,
        FakeBeamlitOptions {
            https: vec![(remote.ipv4, HTTPS_PORT).into()],
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            models_fail_status,
            ..Default::default()
        },
    )?;
    Ok((topo, client, fake))
}

/// The fake's API base (`https://<ip>:8443/v0`), trusting the test CA.
fn config(fake: &FakeBeamlit, secret: &str) -> Result<BeamlitApiConfig> {
    Ok(BeamlitApiConfig {
        base_url: fake.https_url("/v0")?,
        client_id: CLIENT_ID.into(),
        client_secret: Secret::new(secret),
        workspace: "ws".into(),
        extra_ca_file: Some(fake.ca_pem().to_path_buf()),
        timeout: Duration::from_secs(10),
        use_env_proxy: false,
    })
}

fn model() -> Model {
    let mut m = Model::new(MODEL, ENV, true, true);
    m.spec.runtime = Some(Runtime {
        serving_port: Some(80),
        metric_port: None,
    });
    m.spec.policies = vec!["eu-only".into()];
    m
}

/// Runs `f` on a thread inside `ns`, on a current-thread tokio runtime built
/// there: every socket the client opens belongs to the namespace.
fn in_netns<T, F, Fut>(ns: &Netns, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })?
}

/// The HTTP status curl got for `args` from inside `ns`.
fn curl_code(ns: &Netns, args: &[&str]) -> Result<u16> {
    let mut cmd = ns.cmd("curl");
    cmd.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
    ])
    .args(["-w", "%{http_code}"])
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = spawn(cmd, None)?.wait_with_output_timeout(Duration::from_secs(15))?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn assert_no_secret(err: &ApiError) {
    let text = format!("{err} {err:?}");
    assert!(!text.contains(CLIENT_SECRET), "secret leaked: {text}");
    assert!(!text.contains("tok-"), "token leaked: {text}");
}

#[test]
fn model_lifecycle_with_one_token() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, fake) = bed("bapilife", None)?;
    let cfg = config(&fake, CLIENT_SECRET)?;
    let m = model();
    in_netns(&client.netns, move || async move {
        let api = BeamlitApi::new(cfg)?;
        // Five calls at once before any token: one token request serves them all.
        let gets = futures::future::join_all((0..5).map(|_| api.get_model(MODEL, ENV))).await;
        for got in gets {
            ensure!(got?.is_none(), "a model exists before it was created");
        }

        // Missing: PUT answers 404, then POST creates it.
        api.upsert_model(&m).await?;
        let stored = api.get_model(MODEL, ENV).await?.context("not created")?;
        assert_eq!(stored, serde_json::to_value(&m)?);
        // `?environment=` is sent: another environment does not see it.
        assert_eq!(api.get_model(MODEL, "staging").await?, None);

        // Existing: a single PUT replaces it (enabled: false is kept, not omitted).
        let mut disabled = m.clone();
        disabled.spec.enabled = false;
        api.upsert_model(&disabled).await?;
        let stored = api.get_model(MODEL, ENV).await?.context("gone")?;
        assert_eq!(stored["spec"]["enabled"], false);

        api.set_offloading_label(MODEL, ENV, true).await?;
        // Already set: read, no write.
        api.set_offloading_label(MODEL, ENV, true).await?;
        let stored = api.get_model(MODEL, ENV).await?.context("gone")?;
        assert_eq!(stored["metadata"]["labels"]["offloading"], "true");
        // The rest of the model is kept.
        assert_eq!(
            stored["metadata"]["labels"]["managed-by"],
            "beamlit-operator"
        );
        assert_eq!(stored["spec"]["policies"][0], "eu-only");
        api.set_offloading_label(MODEL, ENV, false).await?;
        let stored = api.get_model(MODEL, ENV).await?.context("gone")?;
        assert_eq!(stored["metadata"]["labels"]["offloading"], "false");

        api.delete_model(MODEL, ENV).await?;
        // Already gone: 404 is success.
        api.delete_model(MODEL, ENV).await?;
        match api.set_offloading_label(MODEL, ENV, true).await {
            Err(ApiError::Http {
                op: Operation::SetOffloadingLabel,
                status: 404,
                ..
            }) => {}
            other => bail!("labelling a missing model: {other:?}"),
        }
        Ok(())
    })?;

    let stats = fake.stats()?;
    assert_eq!(stats.token_requests, 1, "{stats:#?}");
    assert_eq!(stats.tokens_issued, ["tok-1"]);
    assert!(stats.models.is_empty(), "{:?}", stats.models);
    // GET: 5 at first, 2 after creating, 1 after the update, 3 for the three
    // label calls and 2 to check them, 1 labelling the missing model.
    assert_eq!(stats.model_requests("GET"), 14, "{stats:#?}");
    assert_eq!(stats.model_requests("POST"), 1);
    // 404 + update + label true + label false.
    assert_eq!(stats.model_requests("PUT"), 4);
    assert_eq!(stats.model_requests("DELETE"), 2);

    // The models API wants a token even though the fake runs without
    // --require-token, and the data plane's look-alike paths still reach the echo.
    let ca = fake.ca_pem().display().to_string();
    let url = fake.https_url("/v0/models/llama")?;
    assert_eq!(curl_code(&client.netns, &["--cacert", &ca, &url])?, 401);
    let echo = fake.https_url("/ws/models/llama")?;
    assert_eq!(curl_code(&client.netns, &["--cacert", &ca, &echo])?, 200);
    Ok(())
}

#[test]
fn a_revoked_token_is_replaced_once_after_a_401() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, fake) = bed("bapirevoke", None)?;
    let cfg = config(&fake, CLIENT_SECRET)?;
    let m = model();
    // The fake is restarted from inside the closure, between two calls of the
    // same client (the restart itself runs `ip netns exec`, not our namespace).
    let fake = in_netns(&client.netns, move || async move {
        let mut fake = fake;
        let api = BeamlitApi::new(cfg)?;
        api.upsert_model(&m).await?;
        fake.revoke_tokens()?;
        // The restart blocked this runtime, so the pooled connection to the old
        // process has not seen its close yet; let it, as a running controller
        // would have, rather than send the next request into a dead connection.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // PUT with tok-1 → 401 → tok-2 → PUT again → 200.
        api.upsert_model(&m).await?;
        api.delete_model(MODEL, ENV).await?;
        Ok(fake)
    })?;
    let stats = fake.stats()?;
    assert_eq!(stats.tokens_issued, ["tok-1", "tok-2"], "{stats:#?}");
    assert_eq!(stats.token_requests, 2);
    // 404 and its POST; then 401 and the retry.
    assert_eq!(stats.model_requests("PUT"), 3, "{stats:#?}");
    assert_eq!(stats.model_requests("POST"), 1);
    assert!(stats.models.is_empty());
    Ok(())
}

#[test]
fn server_errors_name_the_operation_and_status_without_secrets() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, fake) = bed("bapi500", Some(500))?;
    let cfg = config(&fake, CLIENT_SECRET)?;
    let m = model();
    let errors = in_netns(&client.netns, move || async move {
        let api = BeamlitApi::new(cfg)?;
        let upsert = api.upsert_model(&m).await.err().context("upsert passed")?;
        let delete = api
            .delete_model(MODEL, ENV)
            .await
            .err()
            .context("delete passed")?;
        let label = api
            .set_offloading_label(MODEL, ENV, true)
            .await
            .err()
            .context("label passed")?;
        Ok([upsert, delete, label])
    })?;
    let ops = [
        Operation::Update,
        Operation::Delete,
        Operation::SetOffloadingLabel,
    ];
    for (err, want_op) in errors.iter().zip(ops) {
        match err {
            ApiError::Http {
                op, status, body, ..
            } => {
                assert_eq!((*op, *status), (want_op, 500), "{err}");
                assert!(body.contains("injected"), "{body}");
            }
            other => bail!("expected an HTTP error, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains(&format!("cannot {want_op} model \"llama\": HTTP 500")),
            "{text}"
        );
        assert!(err.is_transient());
        assert_no_secret(err);
    }
    let stats = fake.stats()?;
    // A 500 on PUT is not a 404: no POST is tried.
    assert_eq!(stats.model_requests("POST"), 0);
    assert_eq!(stats.token_requests, 1);
    Ok(())
}

#[test]
fn a_wrong_secret_or_an_untrusted_server_is_a_token_error() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let (_topo, client, fake) = bed("bapitoken", None)?;
    let wrong = config(&fake, "wrong-secret-value-91c2")?;
    let untrusted = BeamlitApiConfig {
        extra_ca_file: None,
        ..config(&fake, CLIENT_SECRET)?
    };
    let m = model();
    let (refused, unverified) = in_netns(&client.netns, move || async move {
        let refused = BeamlitApi::new(wrong)?
            .upsert_model(&m)
            .await
            .err()
            .context("a wrong secret was accepted")?;
        let unverified = BeamlitApi::new(untrusted)?
            .delete_model(MODEL, ENV)
            .await
            .err()
            .context("a server signed by an unknown CA was trusted")?;
        Ok((refused, unverified))
    })?;

    match &refused {
        ApiError::Token {
            op: Operation::Update,
            status: Some(401),
            reason,
            ..
        } => assert!(reason.contains("invalid_client"), "{reason}"),
        other => bail!("wrong secret: {other:?}"),
    }
    assert!(!refused.is_transient());
    assert!(
        refused
            .to_string()
            .contains("cannot update model \"llama\": no access token from https://"),
        "{refused}"
    );
    assert!(!format!("{refused} {refused:?}").contains("wrong-secret-value-91c2"));

    match &unverified {
        ApiError::Token {
            op: Operation::Delete,
            status: None,
            reason,
            ..
        } => assert!(reason.to_lowercase().contains("certificate"), "{reason}"),
        other => bail!("untrusted server: {other:?}"),
    }
    assert_no_secret(&unverified);

    let stats = fake.stats()?;
    // The refused token request reached the fake; the unverified one never
    // got past TLS. No model request was sent without a token.
    assert_eq!(stats.token_requests, 1, "{stats:#?}");
    assert!(stats.tokens_issued.is_empty());
    assert!(stats.model_requests.is_empty(), "{stats:#?}");
    Ok(())
}
