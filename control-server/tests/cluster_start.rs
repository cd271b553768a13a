//! Cluster mode's refusals at start: etcd unreachable, a weak secret, a bad node id. Each is a
//! clear message on stderr and a non-zero exit, before anything listens.

use std::process::Command;

fn server() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_control-server"));
    c.args(["--listen", "127.0.0.1:0", "--no-demo"]);
    c
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("its address").port()
}

#[test]
fn etcd_unreachable_at_start_is_a_clear_error_naming_the_url() {
    // Nothing listens on this port.
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = server()
        .args(["--cluster-etcd", &url, "--node-id", "a"])
        .args(["--advertise-url", "http://127.0.0.1:9"])
        .env("P2P_CLUSTER_SECRET", "0123456789abcdef-secret")
        .output()
        .expect("running control-server");
    assert!(!out.status.success(), "it must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach etcd at") && err.contains(&url),
        "stderr: {err}"
    );
}

#[test]
fn a_weak_secret_or_a_bad_node_id_is_refused() {
    let base = |secret: &str, id: &str| {
        server()
            .args(["--cluster-etcd", "http://127.0.0.1:9", "--node-id", id])
            .args(["--advertise-url", "http://127.0.0.1:9"])
            .env("P2P_CLUSTER_SECRET", secret)
            .output()
            .expect("running control-server")
    };
    let out = base("short", "a");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 16 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = base("0123456789abcdef-secret", "a/b");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node id \"a/b\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
