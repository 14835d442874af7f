//! Address plan. Pods come from 198.18.0.0/16 and service virtual IPs from 198.19.0.0/16
//! (RFC 2544's benchmarking range), IPv6 from 2001:db8::/32 (RFC 3849's documentation range):
//! none of them is routed anywhere outside the lab's own namespaces.

use anyhow::{bail, Result};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The bridge's address: every pod's default route.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub fn gateway_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 1)
}

/// The i-th pod's address (0-based), from 198.18.0.2 on.
pub fn pod_v4(i: usize) -> Result<Ipv4Addr> {
    nth(198, 18, i + 2)
}

pub fn pod_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x18,
        0,
        0,
        0,
        ((i + 2) >> 16) as u16,
        (i + 2) as u16,
    )
}

/// The j-th service's virtual IP (0-based), from 198.19.0.1 on.
pub fn vip_v4(j: usize) -> Result<Ipv4Addr> {
    nth(198, 19, j + 1)
}

pub fn vip_v6(j: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x19,
        0,
        0,
        0,
        ((j + 1) >> 16) as u16,
        (j + 1) as u16,
    )
}

fn nth(a: u8, b: u8, n: usize) -> Result<Ipv4Addr> {
    if n >= 65_535 {
        bail!("address space {a}.{b}.0.0/16 is exhausted");
    }
    Ok(Ipv4Addr::new(a, b, (n >> 8) as u8, n as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_vips_come_from_the_benchmark_ranges() {
        assert_eq!(pod_v4(0).unwrap(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(pod_v4(300).unwrap(), Ipv4Addr::new(198, 18, 1, 46));
        assert_eq!(vip_v4(0).unwrap(), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(pod_v6(0).to_string(), "2001:db8:18::2");
        assert_eq!(vip_v6(1).to_string(), "2001:db8:19::2");
        assert!(pod_v4(70_000).is_err());
    }
}
