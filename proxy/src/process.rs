//! Process settings kube-proxy applies to itself at start: the OOM score
//! (`--oom-score-adj`) and, as Go's runtime does for every Go program, the
//! open-files soft limit raised to the hard limit (containerd gives 1,024).

use std::io;

/// Writes `/proc/self/oom_score_adj`.
pub fn set_oom_score_adj(value: i32) -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", value.to_string())
}

/// The current oom_score_adj of this process.
pub fn oom_score_adj() -> io::Result<i32> {
    std::fs::read_to_string("/proc/self/oom_score_adj")?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("unparsable /proc/self/oom_score_adj"))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old, new).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raising the score needs no privilege; lowering below 0 needs
    /// CAP_SYS_RESOURCE (kproxy warns when it lacks it).
    #[test]
    fn oom_score_adj_is_written() {
        let before = oom_score_adj().unwrap();
        let higher = (before + 1).min(1000);
        set_oom_score_adj(higher).unwrap();
        assert_eq!(oom_score_adj().unwrap(), higher);
    }

    #[test]
    fn nofile_soft_limit_reaches_the_hard_limit() {
        let (_, new) = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(new, lim.rlim_max);
    }
}
