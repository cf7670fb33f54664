//! The shipped deployment files stay valid.

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Ok(which) = std::process::Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
    else {
        return;
    };
    if !which.status.success() {
        eprintln!("SKIPPED: systemd-analyze not installed");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/sigil.service"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sigil.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/sigil", env!("CARGO_BIN_EXE_sigil")),
    )
    .unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn kubernetes_example_names_three_replicas_and_the_secrets() {
    let y = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/sigil.yaml"
    ))
    .unwrap();
    for needle in [
        "replicas: 3",
        "SIGIL_KEK",
        "SIGIL_STORE",
        "SIGIL_STORE_CA_FILE",
        "sslmode=verify-full",
        "SIGIL_BOOTSTRAP_SECRET",
        "readinessProbe",
        "kind: Service",
    ] {
        assert!(y.contains(needle), "{needle}");
    }
}
