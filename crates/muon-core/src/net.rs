//! Addresses: network prefixes ([`Cidr`]) and the checks every service VIP and workload
//! address gets ([`check_unicast`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A network prefix, normalised to its network address (as iptables itself stores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `addr/len` or a bare address (a host prefix).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_s {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?} has an invalid prefix length (0..={max})")),
            },
        };
        Ok(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies inside (same family, same first `len` bits).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A unicast address a service or workload can really have: not unspecified, loopback,
/// multicast, broadcast or link-local (nor an IPv4-mapped form of one).
pub fn check_unicast(ip: IpAddr) -> Result<(), String> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let what = match ip {
        _ if ip.is_unspecified() => "the unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_multicast() => "a multicast address",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address",
        IpAddr::V4(v4) if v4.is_link_local() => "a link-local address (169.254.0.0/16)",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            "a link-local address (fe80::/10)"
        }
        _ => return Ok(()),
    };
    Err(format!("{ip} is {what}, not a routable unicast address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_normalise_and_contain() {
        let c = Cidr::parse("198.19.7.9/16").unwrap();
        assert_eq!(c.to_string(), "198.19.0.0/16");
        assert!(c.contains("198.19.255.1".parse().unwrap()));
        assert!(!c.contains("198.18.0.1".parse().unwrap()));
        assert!(!c.contains("2001:db8::1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8:19::/64").unwrap();
        assert!(v6.contains("2001:db8:19::5".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn only_routable_unicast_addresses_pass() {
        for ok in ["198.19.0.1", "10.1.2.3", "2001:db8::1", "fd00::1"] {
            assert_eq!(check_unicast(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "127.9.9.9",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(check_unicast(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
