//! A small synchronous rtnetlink client: one request at a time, each acknowledged
//! (or a dump read to its end), on a socket bound to the network namespace it was
//! opened in. Messages are built and parsed by `netlink-packet-route`.

use netlink_packet_core::{
    ErrorMessage, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeader, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkHeader, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

/// A failed request: the kernel's errno and, when it gave one, its extended-ack text.
#[derive(Debug)]
pub(crate) struct NlError {
    pub io: io::Error,
    pub detail: Option<String>,
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{} ({d})", self.io),
            None => write!(f, "{}", self.io),
        }
    }
}

impl From<io::Error> for NlError {
    fn from(io: io::Error) -> Self {
        NlError { io, detail: None }
    }
}

pub(crate) type NlResult<T> = Result<T, NlError>;

/// One interface as a link dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
}

/// What [`Netlink::set_link`] changes; `None` leaves a property alone.
#[derive(Debug, Default)]
pub(crate) struct LinkChange {
    pub name: Option<String>,
    pub mtu: Option<u32>,
    pub up: Option<bool>,
    /// Moves the link into the network namespace of this fd.
    pub netns_fd: Option<RawFd>,
}

/// A route to add (replacing one with the same destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteSpec {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The NLMSGERR_ATTR_MSG text of an extended ack: with NETLINK_CAP_ACK the error payload
/// is the request's 16-byte header followed by attributes.
fn ext_ack_message(e: &ErrorMessage) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let mut rest = e.header.get(16..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

pub(crate) struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    /// A socket in the calling thread's network namespace; it stays bound to that
    /// namespace whichever thread uses it later.
    pub fn open() -> io::Result<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Best effort: older kernels without extended acks still work.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends one request and collects the replies up to its ACK (or, for a dump, its
    /// DONE). A NACK becomes the error.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (buf, _) = self.sock.recv_from_full()?;
            if buf.is_empty() {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            let mut off = 0;
            while off < buf.len() {
                let rest = &buf[off..];
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest).map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad netlink reply: {e}"),
                        )
                    })?;
                let len = msg.header.length as usize;
                if len < 16 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink reply with a short length",
                    )
                    .into());
                }
                off = off.saturating_add((len + 3) & !3);
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        // Attributes follow only a capped header (NETLINK_CAP_ACK took).
                        let tlvs = NLM_F_CAPPED | NLM_F_ACK_TLVS;
                        let detail = (msg.header.flags & tlvs == tlvs)
                            .then(|| ext_ack_message(&e))
                            .flatten();
                        return Err(NlError {
                            io: e.to_io(),
                            detail,
                        });
                    }
                    NetlinkPayload::Done(d) if d.code != 0 => {
                        return Err(io::Error::from_raw_os_error(d.code.abs()).into())
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Every interface of the socket's namespace.
    pub fn links(&mut self) -> NlResult<Vec<Link>> {
        let replies = self.exchange(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| {
                let mut link = Link {
                    index: l.header.index,
                    name: String::new(),
                    mac: Vec::new(),
                    mtu: 0,
                    up: l.header.flags.contains(LinkFlags::Up),
                };
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Address(m) => link.mac = m,
                        LinkAttribute::Mtu(m) => link.mtu = m,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    pub fn set_link(&mut self, index: u32, change: &LinkChange) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header = LinkHeader {
            index,
            ..Default::default()
        };
        if let Some(up) = change.up {
            msg.header.change_mask = LinkFlags::Up;
            if up {
                msg.header.flags = LinkFlags::Up;
            }
        }
        if let Some(name) = &change.name {
            msg.attributes.push(LinkAttribute::IfName(name.clone()));
        }
        if let Some(mtu) = change.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(fd) = change.netns_fd {
            msg.attributes.push(LinkAttribute::NetNsFd(fd));
        }
        self.exchange(RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
    }

    /// Adds `ip/prefix_len` to the interface (or refreshes it when present). IPv6
    /// addresses skip duplicate address detection: the host allotted them, and DAD would
    /// hold them unusable ("tentative") for a second or more after boot.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> NlResult<()> {
        let mut msg = AddressMessage::default();
        msg.header = AddressHeader {
            family: family(&ip),
            prefix_len,
            scope: AddressScope::Universe,
            index,
            ..Default::default()
        };
        msg.attributes.push(AddressAttribute::Local(ip));
        msg.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.exchange(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Adds a route to the main table, replacing one to the same destination. Without a
    /// gateway the route is link-scoped (the destination is on the link).
    pub fn add_route(&mut self, r: &RouteSpec) -> NlResult<()> {
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            address_family: family(&r.destination),
            destination_prefix_length: r.prefix_len,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Boot,
            scope: if r.gateway.is_some() {
                RouteScope::Universe
            } else {
                RouteScope::Link
            },
            kind: RouteType::Unicast,
            ..Default::default()
        };
        if r.prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_address(r.destination)));
        }
        if let Some(gw) = r.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(gw)));
        }
        if let Some(oif) = r.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        self.exchange(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_ack_text_is_found_after_the_request_header() {
        let mut e = ErrorMessage::default();
        let mut payload = vec![0u8; 16];
        let text = b"Nexthop has invalid gateway\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        e.header = payload;
        assert_eq!(
            ext_ack_message(&e).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        // Truncated or absent attributes: no text, no panic.
        e.header.truncate(21);
        assert_eq!(ext_ack_message(&e), None);
        e.header.truncate(3);
        assert_eq!(ext_ack_message(&e), None);
    }

    #[test]
    fn dumps_links_of_a_fresh_namespace() {
        let links = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare net");
            Netlink::open().and_then(|mut nl| nl.links().map_err(|e| e.io))
        })
        .join()
        .expect("thread")
        .expect("links");
        assert!(links.iter().any(|l| l.name == "lo" && !l.up), "{links:?}");
    }
}
