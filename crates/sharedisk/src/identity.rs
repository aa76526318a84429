//! Stable identity of a logical unit: the unit serial number (VPD 0x80) and the 64-bit value
//! behind its NAA identifier (VPD 0x83); and of a vhost-user socket's target port: its relative
//! target port identifier.
//!
//! Initiators and cluster software (multipath, Windows failover clustering) recognise a disk by
//! these, so they must not change across restarts and must differ between LUs. Configured values
//! win; otherwise they are derived with FNV-1a (stable across builds, unlike `std`'s hasher)
//! from the configured serial, or else from the image's canonical path (for a block device, the
//! path it was configured by, made absolute: a `/dev/disk/by-id` link stays with the disk
//! across reboots, the `/dev/sdX` it resolves to may not).
//!
//! Persistent reservation registrations are kept with their I_T nexus, target port included
//! (SPC-5 5.14.5: APTPL keeps them across power loss), so a socket's relative target port
//! identifier must not change across restarts either, whatever the order of the sockets: when
//! not configured it is derived with FNV-1a from the socket's resolved path.

use std::path::Path;

use crate::config::VHOST_FIRST_PORT_ID;

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The serial and id of an LU.
pub fn derive(canonical_image: &Path, serial: Option<&str>, id: Option<u64>) -> (String, u64) {
    use std::os::unix::ffi::OsStrExt;
    let id = id.unwrap_or_else(|| match serial {
        Some(s) => fnv1a64(s.as_bytes()),
        None => fnv1a64(canonical_image.as_os_str().as_bytes()),
    });
    let serial = serial.map_or_else(|| format!("{id:016x}"), str::to_owned);
    (serial, id)
}

/// The relative target port identifier of a vhost-user socket at `resolved_socket` (its path
/// as [`crate::config::canonical_socket_path`] resolves it): the low 15 bits of the path's
/// FNV-1a, above [`VHOST_FIRST_PORT_ID`], so in 0x8000..=0xFFFF. Two paths of the same length
/// that differ in one byte never get the same identifier (each FNV-1a step is a bijection of
/// the low bits of its state); other paths may, and the config refuses that.
pub fn vhost_port_id(resolved_socket: &Path) -> u16 {
    use std::os::unix::ffi::OsStrExt;
    let low = fnv1a64(resolved_socket.as_os_str().as_bytes()) & 0x7FFF;
    VHOST_FIRST_PORT_ID | u16::try_from(low).expect("15 bits fit in a u16")
}

/// The initiator name of a vhost-user socket at `resolved_socket` that has none configured:
/// `vhost:` and the path, each byte that is not printable ASCII (a space, say) or is `%`
/// written as `%XX`. A path that would make the name longer than the 223 bytes every
/// initiator name is held to is named by its FNV-1a instead, `vhost:fnv:` and 16 hex digits.
pub fn vhost_initiator(resolved_socket: &Path) -> String {
    use std::fmt::Write;
    use std::os::unix::ffi::OsStrExt;
    let bytes = resolved_socket.as_os_str().as_bytes();
    let mut name = String::from("vhost:");
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            name.push(char::from(b));
        } else {
            let _ = write!(name, "%{b:02X}");
        }
    }
    if name.len() > 223 {
        return format!("vhost:fnv:{:016x}", fnv1a64(bytes));
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vhost_initiator_name_is_always_a_valid_one() {
        assert_eq!(
            vhost_initiator(Path::new("/run/vm1.sock")),
            "vhost:/run/vm1.sock"
        );
        // A space (20h) and a percent sign (25h) are written as %XX.
        assert_eq!(
            vhost_initiator(Path::new("/run/my vm/50%.sock")),
            "vhost:/run/my%20vm/50%25.sock"
        );
        // 218 bytes of path make 224 with "vhost:": too long, named by the path's FNV-1a.
        let long = format!("/{}", "a".repeat(217));
        let name = vhost_initiator(Path::new(&long));
        assert!(name.starts_with("vhost:fnv:"), "{name}");
        assert_eq!(name.len(), "vhost:fnv:".len() + 16);
        // 217 bytes make 223: kept.
        let fits = format!("/{}", "a".repeat(216));
        assert_eq!(vhost_initiator(Path::new(&fits)), format!("vhost:{fits}"));
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn derived_identity_is_stable_and_differs_per_image() {
        let a = derive(Path::new("/srv/a.img"), None, None);
        assert_eq!(a, derive(Path::new("/srv/a.img"), None, None));
        assert_ne!(a.1, derive(Path::new("/srv/b.img"), None, None).1);
        assert_eq!(a.0, format!("{:016x}", a.1));
    }

    #[test]
    fn configured_values_win() {
        assert_eq!(
            derive(Path::new("/srv/a.img"), Some("SER1"), Some(7)),
            ("SER1".to_string(), 7)
        );
        let (serial, id) = derive(Path::new("/srv/a.img"), Some("SER1"), None);
        assert_eq!(serial, "SER1");
        assert_eq!(id, fnv1a64(b"SER1"));
        let (serial, _) = derive(Path::new("/srv/a.img"), None, Some(0xabc));
        assert_eq!(serial, "0000000000000abc");
    }
}
