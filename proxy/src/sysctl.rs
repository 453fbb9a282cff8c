//! The sysctls kube-proxy sets at start, applied the same way: conntrack
//! sizing and timeouts (`--conntrack-*`) and, in iptables mode with
//! localhost node ports, `net.ipv4.conf.all.route_localnet`.
//!
//! A value of zero leaves the kernel's setting alone, as in kube-proxy.
//! `nf_conntrack_max` and the conntrack hash size are global to the kernel:
//! they are only written from the initial network namespace (elsewhere the
//! kernel refuses, and a test namespace must not touch the host). The other
//! settings are per network namespace. Every change is logged; a setting
//! that cannot be written is a warning, not a reason to stop serving.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// One sysctl to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Path under `/proc/sys`, e.g. `net/netfilter/nf_conntrack_max`.
    pub name: &'static str,
    pub value: i64,
    /// Kernel-wide (only from the initial network namespace).
    pub global: bool,
}

pub const CONNTRACK_MAX: &str = "net/netfilter/nf_conntrack_max";
pub const TCP_ESTABLISHED: &str = "net/netfilter/nf_conntrack_tcp_timeout_established";
pub const TCP_CLOSE_WAIT: &str = "net/netfilter/nf_conntrack_tcp_timeout_close_wait";
pub const TCP_BE_LIBERAL: &str = "net/netfilter/nf_conntrack_tcp_be_liberal";
pub const UDP_TIMEOUT: &str = "net/netfilter/nf_conntrack_udp_timeout";
pub const UDP_STREAM_TIMEOUT: &str = "net/netfilter/nf_conntrack_udp_timeout_stream";
pub const ROUTE_LOCALNET: &str = "net/ipv4/conf/all/route_localnet";

/// kube-proxy's `--conntrack-*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackConfig {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

impl ConntrackConfig {
    /// `nf_conntrack_max`: max-per-core × CPUs, at least `min`; `None`
    /// (leave as is) when max-per-core is 0.
    pub fn max(&self, cpus: u64) -> Option<i64> {
        if self.max_per_core == 0 {
            return None;
        }
        let scaled = u64::from(self.max_per_core) * cpus;
        Some(scaled.max(u64::from(self.min)) as i64)
    }

    /// The settings to apply, in kube-proxy's order.
    pub fn settings(&self, cpus: u64) -> Vec<Setting> {
        let mut out = Vec::new();
        if let Some(max) = self.max(cpus) {
            out.push(Setting {
                name: CONNTRACK_MAX,
                value: max,
                global: true,
            });
        }
        for (name, d) in [
            (TCP_ESTABLISHED, self.tcp_established),
            (TCP_CLOSE_WAIT, self.tcp_close_wait),
        ] {
            if d.as_secs() > 0 {
                out.push(Setting {
                    name,
                    value: d.as_secs() as i64,
                    global: false,
                });
            }
        }
        if self.tcp_be_liberal {
            out.push(Setting {
                name: TCP_BE_LIBERAL,
                value: 1,
                global: false,
            });
        }
        for (name, d) in [
            (UDP_TIMEOUT, self.udp_timeout),
            (UDP_STREAM_TIMEOUT, self.udp_stream_timeout),
        ] {
            if d.as_secs() > 0 {
                out.push(Setting {
                    name,
                    value: d.as_secs() as i64,
                    global: false,
                });
            }
        }
        out
    }
}

/// Reading and writing sysctls (a fake in tests).
pub trait Sysctls {
    fn get(&self, name: &str) -> io::Result<i64>;
    fn set(&mut self, name: &str, value: i64) -> io::Result<()>;
    /// Whether this process is in the initial network namespace.
    fn in_initial_netns(&self) -> bool;
    /// The conntrack hash size (`/sys/module/nf_conntrack/parameters/hashsize`).
    fn hashsize(&self) -> io::Result<i64>;
    fn set_hashsize(&mut self, value: i64) -> io::Result<()>;
}

/// `/proc/sys` of the calling thread's network namespace.
#[derive(Debug, Default)]
pub struct ProcSysctls;

const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

fn read_int(path: &std::path::Path) -> io::Result<i64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{} is not a number", path.display())))
}

impl Sysctls for ProcSysctls {
    fn get(&self, name: &str) -> io::Result<i64> {
        read_int(&PathBuf::from("/proc/sys").join(name))
    }

    fn set(&mut self, name: &str, value: i64) -> io::Result<()> {
        std::fs::write(PathBuf::from("/proc/sys").join(name), value.to_string())
    }

    fn in_initial_netns(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        match (ino("/proc/thread-self/ns/net"), ino("/proc/1/ns/net")) {
            (Some(a), Some(b)) => a == b,
            // Cannot tell: do not touch kernel-wide settings.
            _ => false,
        }
    }

    fn hashsize(&self) -> io::Result<i64> {
        read_int(std::path::Path::new(HASHSIZE))
    }

    fn set_hashsize(&mut self, value: i64) -> io::Result<()> {
        std::fs::write(HASHSIZE, value.to_string())
    }
}

/// What [`apply`] did with one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Changed from the old value.
    Changed {
        old: i64,
    },
    Unchanged,
    /// Kernel-wide, and this is not the initial network namespace.
    SkippedGlobal,
    /// The sysctl does not exist (yet): nf_conntrack is not loaded.
    Missing,
    Failed(String),
}

/// Applies `settings` (each only when the value differs) and logs every
/// change. Returns the outcome of each, in order.
pub fn apply(sysctls: &mut dyn Sysctls, settings: &[Setting]) -> Vec<(Setting, Outcome)> {
    let initial = sysctls.in_initial_netns();
    let mut out = Vec::with_capacity(settings.len());
    for s in settings {
        let outcome = if s.global && !initial {
            tracing::info!(
                sysctl = s.name,
                value = s.value,
                "not in the initial network namespace: leaving the kernel-wide setting as it is"
            );
            Outcome::SkippedGlobal
        } else {
            apply_one(sysctls, s)
        };
        match &outcome {
            Outcome::Changed { old } => {
                tracing::info!(sysctl = s.name, old, new = s.value, "set sysctl")
            }
            Outcome::Failed(e) => {
                tracing::warn!(sysctl = s.name, value = s.value, error = %e, "cannot set sysctl; continuing with the kernel's value")
            }
            _ => {}
        }
        if s.name == CONNTRACK_MAX
            && matches!(outcome, Outcome::Changed { .. } | Outcome::Unchanged)
        {
            raise_hashsize(sysctls, s.value);
        }
        out.push((s.clone(), outcome));
    }
    out
}

fn apply_one(sysctls: &mut dyn Sysctls, s: &Setting) -> Outcome {
    match sysctls.get(s.name) {
        Ok(v) if v == s.value => Outcome::Unchanged,
        Ok(old) => match sysctls.set(s.name, s.value) {
            Ok(()) => Outcome::Changed { old },
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Missing,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// kube-proxy keeps the conntrack hash table at a quarter of the maximum
/// (only growing it).
fn raise_hashsize(sysctls: &mut dyn Sysctls, max: i64) {
    let want = max / 4;
    match sysctls.hashsize() {
        Ok(have) if have >= want => {}
        Ok(have) => match sysctls.set_hashsize(want) {
            Ok(()) => tracing::info!(old = have, new = want, "set conntrack hashsize"),
            Err(e) => {
                tracing::warn!(error = %e, want, "cannot set the conntrack hashsize (is /sys read-only?)")
            }
        },
        Err(e) => tracing::debug!(error = %e, "conntrack hashsize unreadable"),
    }
}

/// Online CPUs (`/sys/devices/system/cpu/online`, as kube-proxy counts
/// them), else what the process may use.
pub fn cpu_count() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(1)
        })
}

/// Counts a kernel CPU list such as `0-3,6,8-9`.
fn count_cpu_list(s: &str) -> Option<u64> {
    let mut n = 0;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Default)]
    struct Fake {
        values: BTreeMap<String, i64>,
        initial: bool,
        hashsize: i64,
        read_only: bool,
    }

    impl Sysctls for Fake {
        fn get(&self, name: &str) -> io::Result<i64> {
            self.values
                .get(name)
                .copied()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn set(&mut self, name: &str, value: i64) -> io::Result<()> {
            if self.read_only {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            self.values.insert(name.into(), value);
            Ok(())
        }
        fn in_initial_netns(&self) -> bool {
            self.initial
        }
        fn hashsize(&self) -> io::Result<i64> {
            Ok(self.hashsize)
        }
        fn set_hashsize(&mut self, value: i64) -> io::Result<()> {
            self.hashsize = value;
            Ok(())
        }
    }

    fn defaults() -> ConntrackConfig {
        ConntrackConfig {
            max_per_core: 32768,
            min: 131072,
            tcp_established: Duration::from_secs(86400),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }

    #[test]
    fn max_scales_with_cpus_and_respects_the_minimum() {
        assert_eq!(defaults().max(2), Some(131072));
        assert_eq!(defaults().max(8), Some(262144));
        let off = ConntrackConfig {
            max_per_core: 0,
            ..defaults()
        };
        assert_eq!(off.max(8), None);
        assert!(off.settings(8).iter().all(|s| s.name != CONNTRACK_MAX));
    }

    #[test]
    fn zero_leaves_a_setting_alone() {
        let c = ConntrackConfig {
            max_per_core: 0,
            tcp_established: Duration::ZERO,
            tcp_close_wait: Duration::ZERO,
            ..defaults()
        };
        assert!(c.settings(4).is_empty());
        let c = ConntrackConfig {
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(30),
            udp_stream_timeout: Duration::from_secs(120),
            ..defaults()
        };
        let names: Vec<&str> = c.settings(1).iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                CONNTRACK_MAX,
                TCP_ESTABLISHED,
                TCP_CLOSE_WAIT,
                TCP_BE_LIBERAL,
                UDP_TIMEOUT,
                UDP_STREAM_TIMEOUT
            ]
        );
    }

    #[test]
    fn applies_changes_only_and_keeps_global_ones_for_the_initial_namespace() {
        let mut fake = Fake {
            values: [
                (CONNTRACK_MAX, 65536),
                (TCP_ESTABLISHED, 432000),
                (TCP_CLOSE_WAIT, 3600),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            initial: false,
            hashsize: 16384,
            ..Fake::default()
        };
        let out = apply(&mut fake, &defaults().settings(2));
        assert_eq!(out[0].1, Outcome::SkippedGlobal);
        assert_eq!(out[1].1, Outcome::Changed { old: 432000 });
        assert_eq!(out[2].1, Outcome::Unchanged);
        assert_eq!(fake.values[CONNTRACK_MAX], 65536);
        assert_eq!(fake.hashsize, 16384);

        fake.initial = true;
        let out = apply(&mut fake, &defaults().settings(2));
        assert_eq!(out[0].1, Outcome::Changed { old: 65536 });
        assert_eq!(fake.values[CONNTRACK_MAX], 131072);
        assert_eq!(fake.hashsize, 32768, "hash size follows max/4");
    }

    #[test]
    fn missing_and_read_only_sysctls_are_reported_not_fatal() {
        let mut fake = Fake {
            initial: true,
            ..Fake::default()
        };
        let out = apply(&mut fake, &defaults().settings(1));
        assert!(out.iter().all(|(_, o)| *o == Outcome::Missing));
        fake.values.insert(TCP_ESTABLISHED.into(), 1);
        fake.read_only = true;
        let out = apply(&mut fake, &defaults().settings(1));
        assert!(matches!(out[1].1, Outcome::Failed(_)));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("x"), None);
        assert!(cpu_count() >= 1);
    }
}
