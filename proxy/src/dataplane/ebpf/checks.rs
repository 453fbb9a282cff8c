//! Start-up checks: each names what is missing and how to fix it, instead of
//! a raw syscall or verifier error later. Also finds the defaults for
//! `--cgroup-root` and `--devices`.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::dataplane::DataplaneError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

fn missing(msg: String) -> DataplaneError {
    DataplaneError::MissingFeature(msg)
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// The first cgroup2 mount in /proc/mounts.
pub fn detect_cgroup2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

pub fn check_btf() -> Result<(), DataplaneError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(missing(
            "BTF: /sys/kernel/btf/vmlinux does not exist; ebpf mode needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (or use --proxy-mode iptables)".into(),
        ))
    }
}

/// The pin path must be on a bpf filesystem (its nearest existing ancestor).
pub fn check_bpffs(pin: &Path) -> Result<(), DataplaneError> {
    let mut p = pin;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    match fs_magic(p) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        Ok(_) => Err(missing(format!(
            "bpffs: {} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` (in a DaemonSet: a hostPath volume for /sys/fs/bpf) or point --bpf-pin-path at a bpffs mount",
            p.display()
        ))),
        Err(e) => Err(missing(format!("bpffs: cannot stat {}: {e}", p.display()))),
    }
}

pub fn check_cgroup(root: &Path) -> Result<(), DataplaneError> {
    if !root.is_dir() {
        return Err(missing(format!(
            "cgroup2: --cgroup-root {} does not exist or is not a directory; give a directory on a cgroup2 mount (see `grep cgroup2 /proc/mounts`)",
            root.display()
        )));
    }
    match fs_magic(root) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(_) => Err(missing(format!(
            "cgroup2: --cgroup-root {} is not on a cgroup2 filesystem; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified` and pass it",
            root.display()
        ))),
        Err(e) => Err(missing(format!("cgroup2: cannot stat {}: {e}", root.display()))),
    }
}

/// TC programs are attached as TCX links (pinnable, atomically replaceable),
/// which needs Linux 6.6.
pub fn check_tcx() -> Result<(), DataplaneError> {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(['.', '-'])
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    if (major, minor) >= (6, 6) {
        Ok(())
    } else {
        Err(missing(format!(
            "TC: kernel {} is older than 6.6, which kproxy needs for TCX links on clsact ingress/egress; upgrade the kernel or use --proxy-mode iptables",
            rel.trim()
        )))
    }
}

/// A network device of this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    /// First IPv4 address: the SNAT source for traffic leaving here.
    pub ipv4: Option<Ipv4Addr>,
}

/// Every device with its first IPv4 address, loopback excluded.
pub fn list_devices() -> std::io::Result<Vec<Device>> {
    // if_nameindex asks the kernel for the calling thread's network
    // namespace (/sys/class/net would show the namespace sysfs was mounted in).
    let mut out: Vec<Device> = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let mut i = 0;
    loop {
        // SAFETY: within the array up to its zero terminator.
        let e = unsafe { &*list.add(i) };
        if e.if_index == 0 || e.if_name.is_null() {
            break;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(e.if_name) }
            .to_string_lossy()
            .into_owned();
        if name != "lo" {
            out.push(Device {
                name,
                ifindex: e.if_index,
                ipv4: None,
            });
        }
        i += 1;
    }
    // SAFETY: from if_nameindex, freed once.
    unsafe { libc::if_freenameindex(list) };
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list from getifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            // SAFETY: AF_INET means sockaddr_in; ifa_name is a C string.
            let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            if let Some(d) = out.iter_mut().find(|d| d.name == name) {
                if d.ipv4.is_none() {
                    d.ipv4 = Some(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort_by_key(|d| d.ifindex);
    Ok(out)
}

/// `--devices`, or by default every device of the node but loopback: the
/// ones carrying the node's addresses (external traffic, SNAT sources) and
/// the pods' devices (replies of SNATed flows to local backends come back
/// through them, and pod packets that no hooked socket made).
pub fn resolve_devices(wanted: &[String]) -> Result<Vec<Device>, DataplaneError> {
    let all = list_devices()?;
    if wanted.is_empty() {
        if !all.iter().any(|d| d.ipv4.is_some()) {
            return Err(missing(
                "devices: no device with an IPv4 address found; pass --devices".into(),
            ));
        }
        return Ok(all);
    }
    wanted
        .iter()
        .map(|w| {
            all.iter().find(|d| &d.name == w).cloned().ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
                missing(format!(
                    "device {w:?} (from --devices) does not exist in this network namespace; devices here: {}",
                    names.join(", ")
                ))
            })
        })
        .collect()
}

/// NAT ports: 1024-65535 without the node's ephemeral ports
/// (`ip_local_port_range`), which its own connections take without our
/// knowing. Ports the node listens on are fine: replies to a NAT port are
/// translated before any socket sees them.
pub fn snat_port_range() -> (u16, u16, Option<(u16, u16)>) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().map(|s| s.parse::<u32>().ok());
    let (lo, hi) = match (it.next().flatten(), it.next().flatten()) {
        (Some(lo), Some(hi)) => (lo.clamp(1, 65535), hi.clamp(1, 65535)),
        _ => (32768, 60999),
    };
    nat_ports_around(lo as u16, hi as u16)
}

/// 1024-65535 minus the ephemeral range [lo, hi].
fn nat_ports_around(lo: u16, hi: u16) -> (u16, u16, Option<(u16, u16)>) {
    if hi < 1024 || lo > hi {
        return (1024, 65535, None);
    }
    if lo <= 1024 && hi >= 65535 - 1024 {
        // The whole range is ephemeral: share its top, collisions are then
        // possible and we say so.
        tracing::warn!(
            lo,
            hi,
            "ip_local_port_range leaves no room for NAT ports; NATed flows may collide with the node's own connections (set --bpf-nat-port-range)"
        );
        return (61000, 65535, None);
    }
    if lo <= 1024 {
        return (hi + 1, 65535, None);
    }
    if hi == 65535 {
        return (1024, lo - 1, None);
    }
    (1024, 65535, Some((lo, hi)))
}

/// The cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` gives it to the socket programs.
pub fn netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the given length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroup_path_names_flag() {
        let err = check_cgroup(Path::new("/nonexistent/kproxy-cg")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--cgroup-root"), "{text}");
        assert!(text.contains("/nonexistent/kproxy-cg"), "{text}");
    }

    #[test]
    fn a_tmp_dir_is_not_cgroup2() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_cgroup(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not on a cgroup2 filesystem"), "{err}");
    }

    #[test]
    fn bad_device_lists_what_exists() {
        let err = resolve_devices(&["kpx-no-such-dev0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("kpx-no-such-dev0"), "{err}");
        assert!(err.contains("devices here"), "{err}");
    }

    #[test]
    fn nat_ports_leave_out_the_ephemeral_range() {
        assert_eq!(
            nat_ports_around(32768, 60999),
            (1024, 65535, Some((32768, 60999)))
        );
        assert_eq!(nat_ports_around(1024, 60999), (61000, 65535, None));
        assert_eq!(nat_ports_around(40000, 65535), (1024, 39999, None));
        assert_eq!(nat_ports_around(1, 65535), (61000, 65535, None));
        let (lo, hi, skip) = snat_port_range();
        assert!(lo <= hi);
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let v: Vec<u16> = text
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(
            skip == Some((v[0], v[1])) || hi <= v[0] || lo > v[1],
            "{lo}-{hi} {skip:?} vs {v:?}"
        );
    }
}
