//! Logs written to a file carry no ANSI colour codes (tracing-subscriber colours by default,
//! whatever stderr is). Runs the built binary without privileges or a cluster: a configuration
//! with `beamlitApi` makes the controller log through tracing ("Beamlit API configured") before it
//! looks for a kubeconfig, which it then fails to find.
use std::{fs, path::PathBuf, process::Command};

#[test]
fn logs_to_a_file_carry_no_colour() {
    let dir = std::env::temp_dir().join(format!(
        "beamlit-controller-log-colour-{}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).expect("creating the test directory");
    let token = dir.join("token");
    // base64 of `id:secret`, the shape of the chart's beamlitApiToken.
    fs::write(&token, "aWQ6c2VjcmV0\n").expect("writing the token file");
    let config = dir.join("config.yaml");
    fs::write(
        &config,
        format!(
            "workspace: ws\nbeamlitApi:\n  baseUrl: http://127.0.0.1:9/v0\n  tokenFile: {}\n",
            token.display()
        ),
    )
    .expect("writing the configuration");
    let log = dir.join("stderr.log");
    let stderr = fs::File::create(&log).expect("creating the log file");

    let status = Command::new(env!("CARGO_BIN_EXE_beamlit-controller"))
        .arg("--config")
        .arg(&config)
        .env("KUBECONFIG", PathBuf::from(&dir).join("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .status()
        .expect("running beamlit-controller");
    let text = fs::read_to_string(&log).expect("reading the log");
    let _ = fs::remove_dir_all(&dir);

    assert!(!status.success(), "no kubeconfig, so it must stop: {text}");
    assert!(
        text.contains("Beamlit API configured"),
        "the tracing line this test relies on is missing:\n{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file:\n{}",
        text.escape_debug()
    );
}
