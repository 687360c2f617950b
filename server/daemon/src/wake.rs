//! Wake-on-LAN: the magic packet (six 0xFF bytes, then the MAC sixteen times) sent by UDP to
//! port 9 — to the broadcast address of the interface that reaches the machine's last known
//! address, to every interface's broadcast when none is known, or to configured relays (a
//! directed broadcast, or a host that repeats it on a network the server is not on).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use crate::catalog::normalize_mac;

/// The usual Wake-on-LAN port ("discard").
pub const WOL_PORT: u16 = 9;

/// Where magic packets go.
#[derive(Debug, Clone, Default)]
pub struct WakeConfig {
    /// Send here instead of to broadcast addresses (`--wake-relay ADDR[:PORT]`).
    pub relays: Vec<SocketAddr>,
}

/// Why a machine could not be woken.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("{0:?} is not a MAC address")]
    BadMac(String),
    #[error("the machine has no MAC address to wake")]
    NoMac,
    #[error("no network interface with an IPv4 broadcast address to send the magic packet on; set --wake-relay ADDR")]
    NowhereToSend,
    #[error("sending the magic packet to {to}: {source}")]
    Send {
        to: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listing network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
}

/// An IPv4 network of this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub interface: String,
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
}

impl Network {
    fn contains(&self, addr: Ipv4Addr) -> bool {
        let m = u32::from(self.netmask);
        u32::from(self.ip) & m == u32::from(addr) & m
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ip) | !u32::from(self.netmask))
    }
}

/// The magic packet for `mac` (any usual spelling).
pub fn magic_packet(mac: &str) -> Result<[u8; 102], WakeError> {
    let norm = normalize_mac(mac).ok_or_else(|| WakeError::BadMac(mac.to_string()))?;
    let mut bytes = [0u8; 6];
    for (b, part) in bytes.iter_mut().zip(norm.split(':')) {
        *b = u8::from_str_radix(part, 16).map_err(|_| WakeError::BadMac(mac.to_string()))?;
    }
    let mut packet = [0xffu8; 102];
    for chunk in packet[6..].chunks_mut(6) {
        chunk.copy_from_slice(&bytes);
    }
    Ok(packet)
}

/// The server's IPv4 networks with a broadcast address (loopback and point-to-point left out).
pub fn networks() -> Result<Vec<Network>, WakeError> {
    let mut out = Vec::new();
    for iface in if_addrs::get_if_addrs().map_err(WakeError::Interfaces)? {
        if let if_addrs::IfAddr::V4(v4) = &iface.addr {
            if !v4.ip.is_loopback() && v4.netmask != Ipv4Addr::BROADCAST {
                out.push(Network {
                    interface: iface.name.clone(),
                    ip: v4.ip,
                    netmask: v4.netmask,
                });
            }
        }
    }
    Ok(out)
}

/// Where the packets for a machine last seen at `last` go, and why (for the job's log).
pub fn destinations(
    config: &WakeConfig,
    networks: &[Network],
    last: Option<IpAddr>,
) -> (Vec<SocketAddr>, String) {
    if !config.relays.is_empty() {
        return (config.relays.clone(), "the configured relays".into());
    }
    let to = |n: &Network| SocketAddr::from((n.broadcast(), WOL_PORT));
    let last = last.and_then(|a| match a {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(v4),
        _ => None,
    });
    if let Some(addr) = last {
        if let Some(n) = networks.iter().find(|n| n.contains(addr)) {
            return (
                vec![to(n)],
                format!("the broadcast of {} (the network of {addr})", n.interface),
            );
        }
    }
    let why = match last {
        Some(addr) => format!(
            "every network of this server ({addr} is on none of them: set --wake-relay for routed networks)"
        ),
        None => "every network of this server (no address known for the machine)".into(),
    };
    (networks.iter().map(to).collect(), why)
}

/// Sends the magic packet for each of `macs` (three times, as packets may be lost) to each
/// destination; returns the destinations and why they were chosen.
pub fn wake(
    config: &WakeConfig,
    macs: &[String],
    last: Option<IpAddr>,
) -> Result<(Vec<SocketAddr>, String), WakeError> {
    if macs.is_empty() {
        return Err(WakeError::NoMac);
    }
    let packets = macs
        .iter()
        .map(|m| magic_packet(m))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = if config.relays.is_empty() {
        networks()?
    } else {
        Vec::new()
    };
    let (dests, why) = destinations(config, &nets, last);
    if dests.is_empty() {
        return Err(WakeError::NowhereToSend);
    }
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|source| WakeError::Send {
        to: dests[0],
        source,
    })?;
    sock.set_broadcast(true).map_err(|source| WakeError::Send {
        to: dests[0],
        source,
    })?;
    for _ in 0..3 {
        for to in &dests {
            for p in &packets {
                sock.send_to(p, to)
                    .map_err(|source| WakeError::Send { to: *to, source })?;
            }
        }
    }
    tracing::info!("magic packet for {} sent to {why}", macs.join(", "));
    Ok((dests, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, ip: &str, mask: &str) -> Network {
        Network {
            interface: name.into(),
            ip: ip.parse().unwrap(),
            netmask: mask.parse().unwrap(),
        }
    }

    #[test]
    fn the_magic_packet_repeats_the_mac_after_six_ff() {
        let p = magic_packet("52-54-00-AB-cd-01").unwrap();
        assert_eq!(&p[..6], &[0xff; 6]);
        for i in 0..16 {
            assert_eq!(
                &p[6 + 6 * i..12 + 6 * i],
                &[0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]
            );
        }
        assert!(magic_packet("52:54:00").is_err());
    }

    #[test]
    fn the_network_of_the_last_address_is_chosen_else_all() {
        let nets = [
            net("eth0", "10.0.0.5", "255.255.255.0"),
            net("eth1", "192.168.7.1", "255.255.254.0"),
        ];
        let cfg = WakeConfig::default();
        let (d, why) = destinations(&cfg, &nets, "192.168.6.40".parse().ok());
        assert_eq!(d, ["192.168.7.255:9".parse::<SocketAddr>().unwrap()]);
        assert!(why.contains("eth1"), "{why}");
        let (d, why) = destinations(&cfg, &nets, "172.16.0.9".parse().ok());
        assert_eq!(d.len(), 2);
        assert!(why.contains("--wake-relay"), "{why}");
        let (d, _) = destinations(&cfg, &nets, "127.0.0.1".parse().ok());
        assert_eq!(
            d.len(),
            2,
            "loopback (a NATed test VM) says nothing about the network"
        );
        let relay = WakeConfig {
            relays: vec!["10.9.9.255:7".parse().unwrap()],
        };
        assert_eq!(destinations(&relay, &nets, None).0, relay.relays);
    }

    #[test]
    fn packets_reach_a_relay() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let cfg = WakeConfig {
            relays: vec![listener.local_addr().unwrap()],
        };
        wake(&cfg, &["52:54:00:00:00:07".into()], None).unwrap();
        let mut buf = [0u8; 200];
        let (n, _) = listener.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &magic_packet("52:54:00:00:00:07").unwrap()[..]);
    }
}
