//! Regions (patent FIG. 2): peers grouped by network boundary, shared by all channels.

use std::net::IpAddr;

/// A region: a configured one (index into the config's region table), or the fallback for peers
/// matching no rule: their IPv4 /16 or IPv6 /48.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Region {
    Named(u16),
    V4([u8; 2]),
    V6([u16; 3]),
}

impl Region {
    /// The fallback region of an address.
    pub fn fallback(ip: IpAddr) -> Region {
        match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                Region::V4([o[0], o[1]])
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                Region::V6([s[0], s[1], s[2]])
            }
        }
    }
}
