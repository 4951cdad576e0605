//! The pod network: the CNI veth in the pod's network namespace, joined to the VM's
//! virtio-net TAP with tc redirects ("tc-redirect", as Kata Containers does it).
//!
//! containerd's CRI plugin creates the pod network namespace and runs CNI, which leaves a
//! veth (normally `eth0`) with the pod's addresses and routes there. Nothing runs in that
//! namespace except the pod's `cocoon-vmm`. [`setup`] reads the veth's MAC, MTU,
//! addresses and routes, creates a TAP next to it and redirects every frame arriving on
//! one device out of the other with `tc` (an `ingress` qdisc on both, and a u32
//! match-everything filter with `action mirred egress redirect`). The guest's NIC gets the
//! veth's MAC and the guest is given the veth's addresses and routes (through the agent's
//! SetupNetwork), so to the CNI plugin and the rest of the cluster the VM *is* the veth's
//! far end: no bridge, no NAT, no host routes, and any CNI plugin works unchanged.
//! (`matchall` would be the simpler classifier, but it is a separate module,
//! `cls_matchall`, missing from some kernels; u32 is everywhere.)
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` from a helper thread that
//! has entered the namespace (`setns` affects only that thread), and is not persistent:
//! the device lives exactly as long as an open fd does. The fd is passed to the VMM on
//! exec, so if the VMM dies the TAP disappears with it. [`teardown`] removes the TAP (if
//! still there) and the ingress qdiscs (which drop their filters); it is idempotent and
//! succeeds when the namespace is already gone.
//!
//! Links, addresses and routes are read with `ip -j` (JSON) and changed with `ip`/`tc`,
//! each started inside the namespace (`setns` between fork and exec: any namespace path
//! works, not only named ones under /var/run/netns). A pod start runs seven of them, the
//! four tc changes as one `tc -batch`: every exec counts where a pod start is measured in
//! emulated milliseconds.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::error::{chain, run, run_with_input, Error, Result};

/// The name of the TAP Cocoon creates in a pod's network namespace.
pub const TAP_NAME: &str = "cocoon-tap0";

/// A route the guest must get: `destination` is a CIDR or `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: String,
    pub gateway: Option<String>,
    /// The veth's name (the pod's interface name inside the guest too).
    pub device: Option<String>,
}

/// The pod's network as the VM must take it over.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The CNI interface (the guest interface gets this name too).
    pub veth: String,
    pub tap_name: String,
    /// The open TAP (for `cocoon-vmm --net fd=N`); the TAP exists while this is open.
    pub tap_fd: Option<OwnedFd>,
    /// The veth's MAC: the guest NIC's MAC ("aa:bb:cc:dd:ee:ff").
    pub mac: String,
    pub mtu: u32,
    /// CIDR strings, IPv4 and IPv6 global addresses ("10.88.0.5/16").
    pub addresses: Vec<String>,
    /// Routes, those without a gateway first (a gateway must be reachable when its route
    /// is added). Routes the kernel derives from an address (`proto kernel`) are left out:
    /// the guest's kernel makes them itself when the address is added.
    pub routes: Vec<Route>,
}

/// What `ip` tells about the veth.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Veth {
    name: String,
    mac: String,
    mtu: u32,
}

fn net_err(netns: &Path, message: impl Into<String>) -> Error {
    Error::Net {
        netns: netns.to_path_buf(),
        message: message.into(),
    }
}

/// Whether `netns` is a live network namespace file (nsfs); false when it is gone or
/// was unmounted (an empty mount-point file stays behind).
pub fn netns_exists(netns: &Path) -> bool {
    crate::sys::is_nsfs(netns)
}

/// `program` (`ip`, `tc`), to be run inside `netns`.
fn in_netns(netns: &Path, program: &str) -> Result<Command> {
    let ns = File::open(netns).map_err(Error::io("opening network namespace", netns))?;
    let mut cmd = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec and only makes the setns
    // system call (async-signal-safe, no allocation) on an fd the closure owns; the fd
    // is close-on-exec, so the program does not inherit it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `PROGRAM -j ARGS` (`ip` or `tc`) in `netns` and parses its JSON array.
fn json_of(netns: &Path, program: &str, args: &[&str]) -> Result<Vec<Value>> {
    let out = run(in_netns(netns, program)?.arg("-j").args(args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => Ok(items),
        Ok(_) | Err(_) => Err(net_err(
            netns,
            format!("`{program} -j {}` printed no JSON array", args.join(" ")),
        )),
    }
}

/// `ip -j ARGS` in `netns`.
fn ip_json(netns: &Path, args: &[&str]) -> Result<Vec<Value>> {
    json_of(netns, "ip", args)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Picks the CNI interface among `ip -j link show` entries: `eth0` if present, else the
/// first Ethernet-type link that is neither loopback nor our TAP.
fn pick_veth(links: &[Value]) -> Option<Veth> {
    let candidates: Vec<&Value> = links
        .iter()
        .filter(|l| str_field(l, "link_type") == Some("ether"))
        .filter(|l| {
            let name = str_field(l, "ifname").unwrap_or("");
            !name.is_empty() && name != TAP_NAME && name != "lo"
        })
        .collect();
    let link = candidates
        .iter()
        .find(|l| str_field(l, "ifname") == Some("eth0"))
        .or_else(|| candidates.first())?;
    Some(Veth {
        name: str_field(link, "ifname")?.to_string(),
        mac: str_field(link, "address")?.to_ascii_lowercase(),
        mtu: link
            .get("mtu")
            .and_then(Value::as_u64)
            .and_then(|m| u32::try_from(m).ok())?,
    })
}

/// Global IPv4/IPv6 addresses of an `ip -j addr show dev X` answer, as CIDRs.
fn parse_addresses(entries: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for entry in entries {
        let Some(infos) = entry.get("addr_info").and_then(Value::as_array) else {
            continue;
        };
        for info in infos {
            let family = str_field(info, "family");
            if !matches!(family, Some("inet") | Some("inet6")) {
                continue;
            }
            // Link-local addresses the guest derives itself (same MAC, same fe80::).
            if str_field(info, "scope").is_some_and(|s| s != "global") {
                continue;
            }
            let (Some(local), Some(prefix)) = (
                str_field(info, "local"),
                info.get("prefixlen").and_then(Value::as_u64),
            ) else {
                continue;
            };
            out.push(format!("{local}/{prefix}"));
        }
    }
    out
}

/// Unicast routes of `ip -j route show` via `veth`, minus the kernel's own.
fn parse_routes(entries: &[Value], veth: &str) -> Vec<Route> {
    let mut routes: Vec<Route> = entries
        .iter()
        .filter(|r| str_field(r, "protocol") != Some("kernel"))
        .filter(|r| str_field(r, "type").is_none_or(|t| t == "unicast"))
        .filter(|r| str_field(r, "dev").is_none_or(|d| d == veth))
        .filter_map(|r| {
            Some(Route {
                destination: str_field(r, "dst")?.to_string(),
                gateway: str_field(r, "gateway").map(str::to_string),
                device: str_field(r, "dev").map(str::to_string),
            })
        })
        .collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    routes
}

/// The veth with its global addresses (CIDR) and routes.
type Inspected = (Veth, Vec<String>, Vec<Route>);

/// Reads the veth's link data, addresses and routes (`links`: `ip -j link show`).
fn inspect(netns: &Path, links: &[Value]) -> Result<Option<Inspected>> {
    let Some(veth) = pick_veth(links) else {
        return Ok(None);
    };
    let addrs = ip_json(netns, &["addr", "show", "dev", &veth.name])?;
    let mut routes = parse_routes(&ip_json(netns, &["-4", "route", "show"])?, &veth.name);
    routes.extend(parse_routes(
        &ip_json(netns, &["-6", "route", "show"])?,
        &veth.name,
    ));
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(Some((veth, parse_addresses(&addrs), routes)))
}

/// Opens a new non-persistent TAP `name` inside `netns` from a thread that joins the
/// namespace, with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. The fd is close-on-exec.
fn open_tap(netns: &Path, name: &str) -> Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(net_err(
            netns,
            format!("TAP name {name:?} is not 1..15 bytes"),
        ));
    }
    let ns = File::open(netns).map_err(Error::io("opening network namespace", netns))?;
    let thread = std::thread::spawn({
        let name = name.to_string();
        move || -> std::io::Result<OwnedFd> {
            // SAFETY: setns takes an fd we own (kept open by `ns` for the call) and a
            // flag; it changes only this thread's network namespace, and this thread
            // ends right after opening the TAP.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::sys::open_tap(&name)
        }
    });
    match thread.join() {
        Ok(Ok(fd)) => Ok(fd),
        Ok(Err(e)) => Err(net_err(netns, format!("creating TAP {name}: {e}"))),
        Err(_) => Err(net_err(netns, "TAP thread panicked")),
    }
}

/// Sets up the TAP and the tc redirects for the pod network in `netns` and returns what
/// the VM needs. `Ok(None)`: the namespace has no interface besides loopback (a pod
/// without network); the VM then gets no NIC. On error nothing is left behind.
///
/// It first removes what an earlier, interrupted setup may have left (see [`teardown`]),
/// so it must only be called for a sandbox whose VMM is not running.
pub fn setup(netns: &Path) -> Result<Option<PodNetwork>> {
    if !netns_exists(netns) {
        return Err(net_err(
            netns,
            "not a network namespace (gone, or never created)",
        ));
    }
    let links = ip_json(netns, &["link", "show"])?;
    // A crashed earlier attempt may have left a TAP or qdiscs: start clean.
    clean(netns, &links)?;
    let Some((veth, addresses, routes)) = inspect(netns, &links)? else {
        info!(netns = %netns.display(), "pod network namespace has no interface: no NIC");
        return Ok(None);
    };
    let tap = open_tap(netns, TAP_NAME)?;
    if let Err(e) = redirect(netns, &veth) {
        drop(tap);
        if let Err(te) = teardown(netns) {
            warn!(netns = %netns.display(), error = %chain(&te), "cleanup after failed setup");
        }
        return Err(e);
    }
    info!(netns = %netns.display(), veth = %veth.name, tap = TAP_NAME, mac = %veth.mac,
        mtu = veth.mtu, addresses = ?addresses, "pod network redirected to TAP");
    Ok(Some(PodNetwork {
        netns: netns.to_path_buf(),
        veth: veth.name,
        tap_name: TAP_NAME.to_string(),
        tap_fd: Some(tap),
        mac: veth.mac,
        mtu: veth.mtu,
        addresses,
        routes,
    }))
}

/// Brings the TAP up with the veth's MTU and adds the redirects both ways.
fn redirect(netns: &Path, veth: &Veth) -> Result<()> {
    let mtu = veth.mtu.to_string();
    run(in_netns(netns, "ip")?.args(["link", "set", "dev", TAP_NAME, "mtu", &mtu, "up"]))?;
    run_with_input(
        in_netns(netns, "tc")?.args(["-batch", "-"]),
        redirect_batch(&veth.name, TAP_NAME).as_bytes(),
    )?;
    Ok(())
}

/// The `tc -batch` lines that redirect every frame from `veth` to `tap` and back.
fn redirect_batch(veth: &str, tap: &str) -> String {
    let mut batch = String::new();
    for (from, to) in [(veth, tap), (tap, veth)] {
        batch.push_str(&format!(
            "qdisc add dev {from} ingress\n\
             filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
             action mirred egress redirect dev {to}\n"
        ));
    }
    batch
}

/// Removes what [`setup`] added in `netns`: the TAP and the ingress qdiscs (with their
/// filters). Idempotent; succeeds if the namespace is gone.
pub fn teardown(netns: &Path) -> Result<()> {
    if !netns_exists(netns) {
        debug!(netns = %netns.display(), "pod network namespace gone: nothing to tear down");
        return Ok(());
    }
    clean(netns, &ip_json(netns, &["link", "show"])?)
}

/// [`teardown`] given the namespace's links (`ip -j link show`).
fn clean(netns: &Path, links: &[Value]) -> Result<()> {
    let has_tap = links
        .iter()
        .any(|l| str_field(l, "ifname") == Some(TAP_NAME));
    if has_tap {
        run(in_netns(netns, "ip")?.args(["link", "del", "dev", TAP_NAME]))?;
        debug!(netns = %netns.display(), tap = TAP_NAME, "TAP removed");
    }
    for dev in ingress_devices(&json_of(netns, "tc", &["qdisc", "show"])?) {
        if dev == TAP_NAME {
            continue; // went with the TAP
        }
        run(in_netns(netns, "tc")?.args(["qdisc", "del", "dev", &dev, "ingress"]))?;
        debug!(netns = %netns.display(), dev, "ingress qdisc removed");
    }
    Ok(())
}

/// The devices with an ingress qdisc in a `tc -j qdisc show` answer.
fn ingress_devices(qdiscs: &[Value]) -> Vec<String> {
    qdiscs
        .iter()
        .filter(|q| str_field(q, "kind") == Some("ingress"))
        .filter_map(|q| str_field(q, "dev").map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn veth_is_eth0_or_the_first_ethernet_link() {
        let links = json!([
            {"ifname": "lo", "link_type": "loopback", "address": "00:00:00:00:00:00", "mtu": 65536},
            {"ifname": TAP_NAME, "link_type": "ether", "address": "02:00:00:00:00:01", "mtu": 1500},
            {"ifname": "net1", "link_type": "ether", "address": "02:00:00:00:00:02", "mtu": 9000},
            {"ifname": "eth0", "link_type": "ether", "address": "7E:1A:0E:E2:1F:69", "mtu": 1450}
        ]);
        let links = links.as_array().expect("array");
        let v = pick_veth(links).expect("eth0");
        assert_eq!(
            v,
            Veth {
                name: "eth0".into(),
                mac: "7e:1a:0e:e2:1f:69".into(),
                mtu: 1450
            }
        );
        let v = pick_veth(&links[..3]).expect("net1");
        assert_eq!(v.name, "net1");
        assert!(pick_veth(&links[..2]).is_none());
        // Missing fields are no interface, not a panic.
        assert!(pick_veth(&[json!({"ifname": "eth0", "link_type": "ether"})]).is_none());
    }

    #[test]
    fn redirect_batch_is_one_tc_command_per_line() {
        let batch = redirect_batch("eth0", TAP_NAME);
        let lines: Vec<&str> = batch.lines().collect();
        assert_eq!(
            lines,
            [
                "qdisc add dev eth0 ingress",
                "filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev cocoon-tap0",
                "qdisc add dev cocoon-tap0 ingress",
                "filter add dev cocoon-tap0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev eth0",
            ]
        );
    }

    #[test]
    fn ingress_devices_of_a_qdisc_listing() {
        let qdiscs = json!([
            {"kind": "noqueue", "handle": "0:", "dev": "lo"},
            {"kind": "ingress", "handle": "ffff:", "dev": "eth0", "parent": "ffff:fff1"},
            {"kind": "fq_codel", "handle": "0:", "dev": "eth0"},
            {"kind": "ingress", "handle": "ffff:"}
        ]);
        assert_eq!(ingress_devices(qdiscs.as_array().expect("array")), ["eth0"]);
    }

    #[test]
    fn addresses_keep_global_ones() {
        let entries = json!([{"addr_info": [
            {"family": "inet", "local": "10.88.0.5", "prefixlen": 16, "scope": "global"},
            {"family": "inet6", "local": "fd00::5", "prefixlen": 64, "scope": "global"},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
            {"family": "inet", "local": "10.0.0.1"}
        ]}]);
        assert_eq!(
            parse_addresses(entries.as_array().expect("array")),
            ["10.88.0.5/16", "fd00::5/64"]
        );
    }

    #[test]
    fn routes_drop_kernel_ones_and_put_link_routes_first() {
        let entries = json!([
            {"dst": "default", "gateway": "169.254.1.1", "dev": "eth0", "flags": []},
            {"dst": "10.88.0.0/16", "dev": "eth0", "protocol": "kernel", "scope": "link"},
            {"dst": "169.254.1.1", "dev": "eth0", "scope": "link", "flags": []},
            {"dst": "10.9.0.0/16", "type": "blackhole", "flags": []},
            {"dst": "10.7.0.0/16", "gateway": "10.88.0.9", "dev": "other", "flags": []}
        ]);
        let routes = parse_routes(entries.as_array().expect("array"), "eth0");
        assert_eq!(
            routes,
            [
                Route {
                    destination: "169.254.1.1".into(),
                    gateway: None,
                    device: Some("eth0".into())
                },
                Route {
                    destination: "default".into(),
                    gateway: Some("169.254.1.1".into()),
                    device: Some("eth0".into())
                },
            ]
        );
    }

    /// A throwaway pod netns with a veth `eth0` whose peer sits in a second netns;
    /// both are deleted on drop, also when a test fails.
    struct TestNet {
        pod: String,
        peer: String,
    }

    impl TestNet {
        fn new() -> TestNet {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let pod = format!("cocoon-rt-pod-{}-{n}", std::process::id());
            let peer = format!("cocoon-rt-peer-{}-{n}", std::process::id());
            let net = TestNet { pod, peer };
            let sh = |cmd: &str| {
                let ok = Command::new("sh")
                    .args(["-c", cmd])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "{cmd}");
            };
            let (p, q) = (&net.pod, &net.peer);
            sh(&format!("ip netns add {p} && ip netns add {q}"));
            sh(&format!(
                "ip link add eth0 netns {p} mtu 1400 type veth peer name vpeer netns {q} mtu 1400"
            ));
            sh(&format!(
                "ip -n {p} link set eth0 up && ip -n {p} addr add 10.200.0.2/24 dev eth0 && \
                 ip -n {p} addr add fd00:200::2/64 dev eth0 nodad && \
                 ip -n {p} route add default via 10.200.0.1 && \
                 ip -n {p} route add 10.201.0.0/16 via 10.200.0.254 && \
                 ip -n {q} link set vpeer up && ip -n {q} addr add 10.200.0.1/24 dev vpeer"
            ));
            net
        }

        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/var/run/netns/{}", self.pod))
        }

        fn sh_out(&self, cmd: &str) -> String {
            let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }

    impl Drop for TestNet {
        fn drop(&mut self) {
            for ns in [&self.pod, &self.peer] {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }

    /// Waits up to 3 s for a frame on the TAP; returns it without the 10-byte vnet header.
    fn read_frame(fd: &OwnedFd) -> Option<Vec<u8>> {
        let frame = Some(std::time::Duration::from_secs(3));
        if !crate::sys::poll_readable(std::os::fd::AsFd::as_fd(fd), frame).unwrap_or(false) {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for its whole length, which we pass; fd is open.
        let len = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let len = usize::try_from(len).ok()?;
        buf.truncate(len);
        Some(buf.split_off(10.min(len)))
    }

    #[test]
    fn setup_redirects_both_ways_and_teardown_leaves_nothing() {
        let net = TestNet::new();
        let ns = net.path();
        let pod = setup(&ns).expect("setup").expect("has eth0");
        assert_eq!(pod.veth, "eth0");
        assert_eq!(pod.mtu, 1400);
        let link = net.sh_out(&format!("ip -n {} -j link show eth0", net.pod));
        assert!(link.contains(&pod.mac), "{link}");
        assert_eq!(pod.addresses, ["10.200.0.2/24", "fd00:200::2/64"]);
        assert!(pod.routes.contains(&Route {
            destination: "default".into(),
            gateway: Some("10.200.0.1".into()),
            device: Some("eth0".into())
        }));
        assert!(pod.routes.iter().any(|r| r.destination == "10.201.0.0/16"));
        assert!(!pod.routes.iter().any(|r| r.destination == "10.200.0.0/24"));

        let tap = net.sh_out(&format!("ip -n {} -j link show {TAP_NAME}", net.pod));
        assert!(tap.contains("\"mtu\":1400") && tap.contains("UP"), "{tap}");
        for (dev, to) in [("eth0", TAP_NAME), (TAP_NAME, "eth0")] {
            let f = net.sh_out(&format!(
                "ip netns exec {} tc filter show dev {dev} ingress",
                net.pod
            ));
            assert!(
                f.contains(&format!("Egress Redirect to device {to}")),
                "{f}"
            );
        }

        // Peer -> veth -> TAP: the peer's ARP request for the pod IP reaches the TAP.
        let fd = pod.tap_fd.as_ref().expect("fd");
        // (bash's /dev/udp: a UDP datagram to the pod IP makes the peer ask with ARP.)
        let _ = Command::new("ip")
            .args(["netns", "exec", &net.peer, "bash", "-c"])
            .arg("echo x > /dev/udp/10.200.0.2/9")
            .output();
        // (The peer also sends IPv6 multicast listener reports and the like: skip them.)
        let mut arp = false;
        while let Some(frame) = read_frame(fd) {
            if frame.len() >= 14 && frame[12..14] == [0x08, 0x06] {
                arp = true;
                break;
            }
        }
        assert!(arp, "no ARP request from the peer on the TAP");

        // TAP -> veth -> peer: a broadcast frame written to the TAP arrives at the peer.
        let rx = |net: &TestNet| -> u64 {
            let s = net.sh_out(&format!("ip -n {} -s -j link show vpeer", net.peer));
            let v: Value = serde_json::from_str(&s).unwrap_or(Value::Null);
            v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
        };
        let before = rx(&net);
        let mut frame = vec![0u8; 10]; // virtio-net header: no offloads
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
        frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        frame.extend_from_slice(&[0u8; 46]);
        // SAFETY: `frame` is readable for its length; fd is an open TAP.
        let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(usize::try_from(n).ok(), Some(frame.len()));
        let mut arrived = false;
        for _ in 0..30 {
            if rx(&net) > before {
                arrived = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(arrived, "frame written to the TAP did not reach the peer");

        // Teardown with the fd still open (the VMM alive) removes everything.
        teardown(&ns).expect("teardown");
        teardown(&ns).expect("teardown is idempotent");
        let links = net.sh_out(&format!("ip -n {} link show", net.pod));
        assert!(!links.contains(TAP_NAME), "{links}");
        let q = net.sh_out(&format!("ip netns exec {} tc qdisc show dev eth0", net.pod));
        assert!(!q.contains("ingress"), "{q}");
        drop(pod);
    }

    #[test]
    fn tap_goes_with_its_fd_and_setup_can_be_repeated() {
        let net = TestNet::new();
        let ns = net.path();
        let pod = setup(&ns).expect("setup").expect("eth0");
        drop(pod); // the VMM died: the TAP vanishes, the veth's qdisc stays
        let links = net.sh_out(&format!("ip -n {} link show", net.pod));
        assert!(!links.contains(TAP_NAME), "{links}");
        // A second setup (e.g. after a crash) starts clean instead of failing.
        let pod = setup(&ns).expect("setup again").expect("eth0");
        assert!(pod.tap_fd.is_some());
        teardown(&ns).expect("teardown");
        let q = net.sh_out(&format!("ip netns exec {} tc qdisc show", net.pod));
        assert!(!q.contains("ingress"), "{q}");
    }

    #[test]
    fn namespaces_without_interface_or_gone() {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cocoon-rt-empty-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(status.map(|s| s.success()).unwrap_or(false));
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        let result = setup(&path);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        assert!(result.expect("setup").is_none());
        // Gone: teardown is fine, setup names the path.
        teardown(&path).expect("teardown of a gone netns");
        let e = setup(&path).expect_err("gone").to_string();
        assert!(
            e.contains(&name) && e.contains("not a network namespace"),
            "{e}"
        );
        // A regular file is not a namespace either.
        let f = tempfile::NamedTempFile::new().expect("tmp");
        assert!(!netns_exists(f.path()));
        teardown(f.path()).expect("teardown of a plain file");
    }

    #[test]
    fn bad_tap_names_are_refused() {
        let e =
            open_tap(Path::new("/proc/self/ns/net"), "a-name-that-is-too-long").expect_err("long");
        assert!(e.to_string().contains("1..15"), "{e}");
    }
}
