//! Which database shard owns a user (README "Sharding").
//!
//! A user's quota slots, decisions and history live on one shard, and the
//! shard is named by the claims partition the user's requests land on: the
//! producer puts a keyed record on `murmur2(key) % partitions` (Apache
//! Kafka's default partitioner, which our producer is set to), and shard
//! `s` of `n` owns the partitions `p` with `p % n == s`. So a claim
//! processor that consumes only its shard's partitions never needs another
//! shard's rows, and the mapping is the broker's, not a second hash that
//! could disagree with it.
//!
//! Each shard also holds its own slice of every release, so the pool a
//! claim draws from is local too.

/// Apache Kafka's `Utils.murmur2` (the Java client's default partitioner
/// hash, and librdkafka's `murmur2_random` for keyed records).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition (of `partitions`, at least 1) a record keyed `key` goes to.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions.max(1)
}

/// The shard (of `shards`, at least 1) that owns `partition`.
pub fn shard_of_partition(partition: u32, shards: u32) -> u32 {
    partition % shards.max(1)
}

/// The shard that owns `user` when claims have `partitions` partitions.
pub fn shard_of_user(user: &str, partitions: u32, shards: u32) -> u32 {
    shard_of_partition(partition_of(user.as_bytes(), partitions), shards)
}

/// How a release of `count` coupons is split into per-shard slices: as
/// evenly as it goes, the first shards taking the remainder.
pub fn slices(count: u32, shards: u32) -> Vec<u32> {
    let shards = shards.max(1);
    (0..shards)
        .map(|s| count / shards + u32::from(s < count % shards))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Apache Kafka's own vectors (`UtilsTest.testMurmur2`).
    #[test]
    fn murmur2_is_kafkas() {
        for (key, want) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(key.as_bytes()), want, "{key}");
        }
    }

    proptest! {
        /// A partition belongs to exactly one shard, so a user does too,
        /// whatever the partition count.
        #[test]
        fn every_user_has_one_shard_its_partitions(user in "\\PC{1,40}", partitions in 1u32..64, shards in 1u32..8) {
            let partition = partition_of(user.as_bytes(), partitions);
            prop_assert!(partition < partitions);
            let shard = shard_of_user(&user, partitions, shards);
            prop_assert!(shard < shards);
            prop_assert_eq!(shard, shard_of_partition(partition, shards));
        }

        #[test]
        fn slices_add_up_and_differ_by_at_most_one(count in 0u32..2_000_000, shards in 1u32..16) {
            let slices = slices(count, shards);
            prop_assert_eq!(slices.len() as u32, shards);
            prop_assert_eq!(slices.iter().sum::<u32>(), count);
            let (min, max) = (slices.iter().min().copied(), slices.iter().max().copied());
            prop_assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1);
        }
    }
}
