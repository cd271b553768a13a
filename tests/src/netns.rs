//! A real NAT test bed (issue 15) made of Linux network namespaces, veth pairs and nftables.
//!
//! ```text
//!   root namespace ── p2pn<PID>h<N> 10.200.0.254 ┐
//!                                              │  bridge br0 10.200.0.0/24 in <P>-inet
//!   <P>-inet (the "internet": control server,  ├── 10.200.0.1   (br0 itself)
//!             STUN, TURN) ─────────────────────┤
//!   <P>-open1 (a public host) ─────────────────├── 10.200.0.101 ...
//!   <P>-r1 (router: NAT / firewall) ───────────└── 10.200.0.11 ... (wan)
//!        └ lan 10.200.11.1/24 ── <P>-h1 (home) 10.200.11.2, default via 10.200.11.1
//! ```
//!
//! Routers masquerade their home network behind their `wan` address with nftables:
//! [`Nat::EndpointIndependent`] is plain `masquerade` (Linux keeps the source port, so one
//! local port maps to one public port whatever the destination; filtering is by address and
//! port, through conntrack), [`Nat::EndpointDependent`] is `masquerade fully-random` (a new
//! random port per destination), and [`Nat::UdpBlocked`] masquerades but drops every UDP packet
//! it would forward (TCP, hence HTTP and the control WebSocket, still passes). Only private
//! addresses (10.200.0.0/16) are used, and forwarding is enabled inside router namespaces only.
//!
//! Names start with `p2pn<PID>-<N>-` (the N-th lab of the process), so concurrent runs do not collide; [`NatLab::new`] first
//! deletes namespaces left by runs whose process is gone (a crash, a kill -9), and dropping the
//! lab deletes all it made, also when a test panics. Processes started inside a namespace must
//! be ended before the lab is dropped (declare the lab first, so that it drops last). Needs
//! root, `ip` (iproute2) and `nft` (nftables).
//!
//! [`connect_in`] opens a TCP connection from inside a namespace; [`Forwarder`] uses it to
//! make a port on a namespace's own loopback (Chromium's DevTools endpoint) reachable from the
//! test process.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Prefix of every namespace and link this module creates.
const PREFIX: &str = "p2pn";

/// The internet namespace's own address (the bridge): where the control server listens.
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// What a home network's router does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    EndpointIndependent,
    EndpointDependent,
    UdpBlocked,
}

/// A namespace with one address, where a browser can run.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// The namespaces of one test run; deleted on drop.
#[derive(Debug)]
pub struct NatLab {
    prefix: String,
    /// The root namespace's end of the veth to the internet bridge.
    root_link: String,
    namespaces: Vec<String>,
    next_router: u8,
    next_open: u8,
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n NS ARGS...`
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Loads an nftables ruleset into `ns`.
fn nft_in(ns: &str, ruleset: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (install Debian's nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every network namespace `ip netns` lists.
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list (install iproute2)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The PID in a name this module made (`p2pn<PID>-…`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Deletes the namespaces of runs whose process no longer exists.
pub fn remove_stale() -> Result<usize> {
    let mut removed = 0;
    for ns in list_namespaces()? {
        let Some(pid) = owner_pid(&ns) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // A veth pair goes with either of its ends' namespaces.
            if run("ip", &["netns", "del", &ns]).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

impl NatLab {
    /// The internet namespace with its bridge, reachable from the test process at
    /// [`INTERNET_IP`] (through a veth whose root end is 10.200.0.254).
    pub fn new() -> Result<NatLab> {
        let stale = remove_stale()?;
        if stale > 0 {
            eprintln!("removed {stale} network namespaces left by earlier runs");
        }
        // Several labs of one process (one per test) get their own names: a namespace outlives
        // its deletion while a process (a browser still exiting) is in it.
        static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{n}", std::process::id());
        let root_end = format!("{PREFIX}{}h{n}", std::process::id());
        let mut lab = NatLab {
            prefix: prefix.clone(),
            root_link: root_end.clone(),
            namespaces: Vec::new(),
            next_router: 1,
            next_open: 1,
        };
        let inet = lab.add_namespace("inet")?;
        ip_in(&inet, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&inet, &["addr", "add", "10.200.0.1/24", "dev", "br0"])?;
        ip_in(&inet, &["link", "set", "br0", "up"])?;
        run(
            "ip",
            &[
                "link", "add", &root_end, "type", "veth", "peer", "name", "tohost", "netns", &inet,
            ],
        )?;
        ip_in(&inet, &["link", "set", "tohost", "master", "br0", "up"])?;
        run("ip", &["addr", "add", "10.200.0.254/24", "dev", &root_end])?;
        run("ip", &["link", "set", &root_end, "up"])?;
        Ok(lab)
    }

    /// The internet namespace (the control server, STUN and TURN run there).
    pub fn internet(&self) -> String {
        format!("{}-inet", self.prefix)
    }

    fn add_namespace(&mut self, name: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        run("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A host on the internet with a public (here: bridge) address and no NAT.
    pub fn add_open(&mut self) -> Result<Host> {
        let n = self.next_open;
        self.next_open += 1;
        let ns = self.add_namespace(&format!("open{n}"))?;
        let ip = Ipv4Addr::new(10, 200, 0, 100 + n);
        let inet = self.internet();
        let port = format!("open{n}");
        ip_in(
            &inet,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip_in(&inet, &["link", "set", &port, "master", "br0", "up"])?;
        ip_in(&ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_in(&ns, &["link", "set", "eth0", "up"])?;
        Ok(Host { ns, ip })
    }

    /// A home network behind a router of kind `nat`; returns the home host.
    pub fn add_home(&mut self, nat: Nat) -> Result<Host> {
        let n = self.next_router;
        self.next_router += 1;
        let router = self.add_namespace(&format!("r{n}"))?;
        let home = self.add_namespace(&format!("h{n}"))?;
        let inet = self.internet();
        let wan_ip = Ipv4Addr::new(10, 200, 0, 10 + n);
        let lan_net = 10 + n;
        let port = format!("wan{n}");
        ip_in(
            &inet,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", &router,
            ],
        )?;
        ip_in(&inet, &["link", "set", &port, "master", "br0", "up"])?;
        ip_in(
            &router,
            &["addr", "add", &format!("{wan_ip}/24"), "dev", "wan"],
        )?;
        ip_in(&router, &["link", "set", "wan", "up"])?;
        ip_in(
            &router,
            &[
                "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", &home,
            ],
        )?;
        ip_in(
            &router,
            &[
                "addr",
                "add",
                &format!("10.200.{lan_net}.1/24"),
                "dev",
                "lan",
            ],
        )?;
        ip_in(&router, &["link", "set", "lan", "up"])?;
        let ip = Ipv4Addr::new(10, 200, lan_net, 2);
        ip_in(&home, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_in(&home, &["link", "set", "eth0", "up"])?;
        ip_in(
            &home,
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.200.{lan_net}.1"),
            ],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &router,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let masquerade = match nat {
            Nat::EndpointDependent => "masquerade fully-random",
            Nat::EndpointIndependent | Nat::UdpBlocked => "masquerade",
        };
        let firewall = if nat == Nat::UdpBlocked {
            "table inet firewall {\n  chain forward {\n    type filter hook forward priority 0;\n    \
             meta l4proto udp drop\n  }\n}\n"
        } else {
            ""
        };
        nft_in(
            &router,
            &format!(
                "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    \
                 oifname \"wan\" {masquerade}\n  }}\n}}\n{firewall}"
            ),
        )?;
        Ok(Host { ns: home, ip })
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        // At once, even if the namespace lingers: the next lab may reuse the address.
        let _ = run("ip", &["link", "del", &self.root_link]);
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("removing network namespace {ns}: {e:#}");
            }
        }
    }
}

/// Runs `f` in a short-lived thread that entered namespace `ns`: a socket it creates stays in
/// `ns` for its whole life, whichever thread uses it afterwards.
pub fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let handle = std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering {path}"))?;
        Ok(f()?)
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in namespace {ns} panicked"))?
}

/// A TCP connection to `addr` made from inside namespace `ns`.
pub fn connect_in(ns: &str, addr: SocketAddr) -> Result<std::net::TcpStream> {
    in_namespace(ns, move || std::net::TcpStream::connect(addr))
        .with_context(|| format!("connecting to {addr} in {ns}"))
}

/// Forwards connections to a port of the test process's loopback to `target` inside `ns`.
/// Stops when dropped.
#[derive(Debug)]
pub struct Forwarder {
    pub local: SocketAddr,
    task: JoinHandle<()>,
}

impl Forwarder {
    pub async fn start(ns: &str, target: SocketAddr) -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let ns = ns.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let ns = ns.clone();
                tokio::spawn(async move {
                    let outbound = tokio::task::spawn_blocking(move || connect_in(&ns, target))
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r)
                        .and_then(|s| {
                            s.set_nonblocking(true)?;
                            Ok(tokio::net::TcpStream::from_std(s)?)
                        });
                    match outbound {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(e) => eprintln!("forwarding into a namespace: {e:#}"),
                    }
                });
            }
        });
        Ok(Forwarder { local, task })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_only_our_names() {
        assert_eq!(owner_pid("p2pn1234-inet"), Some(1234));
        assert_eq!(owner_pid("p2pn77-2-h3"), Some(77));
        assert_eq!(owner_pid("other-ns"), None);
        assert_eq!(owner_pid("p2pn-x"), None);
    }
}
