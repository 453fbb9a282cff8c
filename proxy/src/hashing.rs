//! Hash maps for what the control plane handles in bulk: object keys,
//! Service port names, map keys and ids, tens of thousands of each at
//! start. std's default hasher (SipHash-1-3) was 7 % of the first sync's
//! CPU at 10,000 Services; foldhash is several times cheaper and still
//! seeded per process, so a cluster's object names cannot be chosen to
//! collide on every node.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
