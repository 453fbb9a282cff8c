//! iptables mode: kube-proxy's chain design under the `KPROXY-` prefix,
//! applied with one `iptables-restore --noflush` per sync.
