//! Throwaway network namespaces for network tests: `A` holds a TAP (host side of the
//! guest's NIC) and one end of a veth pair, `B` the other end, as a peer on another subnet.
//!
//! guest 10.77.0.2 ── tap0 10.77.0.1 [A, forwarding] veth-a 10.77.1.1 ── veth-b 10.77.1.2 [B]
//!
//! Both namespaces (and with them every link) are deleted on drop.

use std::process::{Command, Output};

pub const GUEST_IP: &str = "10.77.0.2";
pub const TAP_IP: &str = "10.77.0.1";
pub const PEER_IP: &str = "10.77.1.2";
pub const TAP: &str = "tap0";

pub struct NetLab {
    pub a: String,
    pub b: String,
}

fn ip(args: &[&str]) -> std::io::Result<Output> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

impl NetLab {
    /// Creates the namespaces; `tag` keeps concurrent tests apart.
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let lab = NetLab {
            a: format!("cocoon-{tag}-a"),
            b: format!("cocoon-{tag}-b"),
        };
        let (a, b) = (lab.a.as_str(), lab.b.as_str());
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        ip(&[
            "-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns", b,
        ])?;
        ip(&["-n", a, "link", "set", "lo", "up"])?;
        ip(&["-n", b, "link", "set", "lo", "up"])?;
        ip(&["-n", a, "addr", "add", "10.77.1.1/24", "dev", "veth-a"])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("{PEER_IP}/24"),
            "dev",
            "veth-b",
        ])?;
        ip(&["-n", a, "link", "set", "veth-a", "up"])?;
        ip(&["-n", b, "link", "set", "veth-b", "up"])?;
        ip(&["-n", b, "route", "add", "10.77.0.0/24", "via", "10.77.1.1"])?;
        ip(&[
            "-n", a, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", a, "addr", "add", &format!("{TAP_IP}/24"), "dev", TAP])?;
        ip(&["-n", a, "link", "set", TAP, "up"])?;
        let fwd = lab
            .command(a, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            .output()?;
        if !fwd.status.success() {
            return Err(std::io::Error::other(
                "cannot enable forwarding in namespace A",
            ));
        }
        Ok(lab)
    }

    /// `program args` run inside namespace `ns`.
    pub fn command(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        c
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
