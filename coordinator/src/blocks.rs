//! The coordinator's KV-cache block manager with prefix caching: which blocks of every worker's
//! cache pool belong to which sequence. Workers hold the blocks; the coordinator decides who uses
//! them and ships block tables in each step plan.
//!
//! A block that fills up with known tokens gets a hash chained from its predecessor's
//! (`hash(parent, tokens)`), so equal hashes mean equal token prefixes. Released hashed blocks are
//! not wiped: they wait, least recently used first, until either a new sequence with the same
//! prefix takes them back (a prefix-cache hit: those tokens are not recomputed) or the pool needs
//! room and evicts them. Blocks are reference-counted, so many sequences can share one prefix.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
};

/// Identifies the token content of a full block and everything before it.
pub type BlockHash = u64;

#[derive(Debug, Clone, Default)]
struct BlockState {
    refs: u32,
    hash: Option<BlockHash>,
    /// When it was last released (orders eviction among cached blocks).
    released_at: u64,
}

/// Blocks of a cache pool: free, in use, or cached (unused but holding a known prefix).
#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Unused blocks without content worth keeping.
    free: Vec<u32>,
    /// Unused blocks with a hash, by release time (oldest first): evicted in this order.
    evictable: BTreeMap<u64, u32>,
    /// Hash -> the block holding that prefix (in use or evictable).
    by_hash: HashMap<BlockHash, u32>,
    prefix_caching: bool,
    clock: u64,
    in_use: usize,
}

/// How far a sequence's blocks have been hashed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HashChain {
    /// Leading blocks already hashed.
    pub blocks: usize,
    /// The hash of the last of them.
    pub last: Option<BlockHash>,
}

/// The start of a prompt found in the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// Blocks now referenced by the caller, in order.
    pub blocks: Vec<u32>,
    /// Tokens they hold (`blocks.len() * block_size`).
    pub tokens: usize,
    /// The hashes of those blocks, to continue from.
    pub chain: HashChain,
}

impl BlockManager {
    pub fn new(total: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockManager {
            block_size,
            blocks: vec![BlockState::default(); total],
            free: (0..total as u32).rev().collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            prefix_caching,
            clock: 0,
            in_use: 0,
        }
    }

    /// Whether full blocks are kept and shared between identical prefixes.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.in_use
    }

    /// Unused blocks that still hold a reusable prefix.
    pub fn cached_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks that an allocation can take (free or evictable).
    pub fn available_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes one block (a free one, else the least recently used cached one), or `None`.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.blocks[b as usize].hash.take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.take(block);
        Some(block)
    }

    /// Grows `table` until it covers `tokens` tokens; on failure takes nothing and returns false.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.available_blocks() {
            return false;
        }
        for _ in 0..need {
            let b = self.allocate().expect("counted available blocks");
            table.push(b);
        }
        true
    }

    /// Drops one reference to each block; unreferenced blocks become free or cached.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let state = &mut self.blocks[b as usize];
            debug_assert!(state.refs > 0, "double release of block {b}");
            state.refs = state.refs.saturating_sub(1);
            if state.refs > 0 {
                continue;
            }
            self.in_use -= 1;
            if state.hash.is_some() {
                self.clock += 1;
                state.released_at = self.clock;
                self.evictable.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The longest run of cached full blocks that starts `tokens`, at most `limit` tokens long,
    /// referenced for the caller. Empty when prefix caching is off.
    pub fn lookup_prefix(&mut self, tokens: &[i64], limit: usize) -> PrefixHit {
        let mut hit = PrefixHit::default();
        if !self.prefix_caching {
            return hit;
        }
        let mut parent = None;
        for chunk in tokens[..limit.min(tokens.len())].chunks_exact(self.block_size) {
            let hash = block_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&hash) else {
                break;
            };
            if self.blocks[b as usize].refs == 0 {
                self.evictable.remove(&self.blocks[b as usize].released_at);
            }
            self.take(b);
            hit.blocks.push(b);
            parent = Some(hash);
        }
        hit.tokens = hit.blocks.len() * self.block_size;
        hit.chain = HashChain {
            blocks: hit.blocks.len(),
            last: parent,
        };
        hit
    }

    /// Records the content of `table`'s blocks that `tokens` fills completely and that `chain`
    /// has not seen yet, so later sequences can share them.
    pub fn register_full_blocks(&mut self, table: &[u32], tokens: &[i64], chain: &mut HashChain) {
        let full = (tokens.len() / self.block_size).min(table.len());
        if !self.prefix_caching {
            chain.blocks = full;
            return;
        }
        for i in chain.blocks..full {
            let hash = block_hash(
                chain.last,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            let b = table[i];
            if self.blocks[b as usize].hash.is_none() && !self.by_hash.contains_key(&hash) {
                self.blocks[b as usize].hash = Some(hash);
                self.by_hash.insert(hash, b);
            }
            // The chain continues through blocks that duplicate one already cached.
            chain.last = Some(hash);
        }
        chain.blocks = chain.blocks.max(full);
    }

    fn take(&mut self, block: u32) {
        let state = &mut self.blocks[block as usize];
        if state.refs == 0 {
            self.in_use += 1;
        }
        state.refs += 1;
    }
}

fn block_hash(parent: Option<BlockHash>, tokens: &[i64]) -> BlockHash {
    // SipHash with fixed keys: stable within the process, which is all the cache needs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_account_for_every_block() {
        let mut m = BlockManager::new(4, 16, false);
        let mut a = vec![];
        assert!(m.grow(&mut a, 33));
        assert_eq!((a.len(), m.used_blocks(), m.available_blocks()), (3, 3, 1));
        let mut b = vec![];
        assert!(!m.grow(&mut b, 17), "needs 2 blocks, 1 available");
        assert!(b.is_empty(), "a failed grow takes nothing");
        m.release(&a);
        assert_eq!((m.used_blocks(), m.available_blocks()), (0, 4));
    }

    #[test]
    fn shared_prefixes_are_reused_and_reference_counted() {
        let mut m = BlockManager::new(8, 2, true);
        let prompt = [1, 2, 3, 4, 5];
        let mut first = vec![];
        assert!(m.grow(&mut first, prompt.len()));
        let mut chain = HashChain::default();
        m.register_full_blocks(&first, &prompt, &mut chain);
        assert_eq!(chain.blocks, 2);

        // Same first two blocks, different tail; the lookup stops at the limit.
        let other = [1, 2, 3, 4, 9, 9];
        let hit = m.lookup_prefix(&other, other.len() - 1);
        assert_eq!(hit.blocks, first[..2].to_vec());
        assert_eq!(hit.tokens, 4);
        assert_eq!(m.used_blocks(), 3, "shared blocks count once");
        assert_eq!(
            m.lookup_prefix(&[1, 2, 7, 7], 4).blocks,
            first[..1].to_vec()
        );
        m.release(&first[..1]);

        m.release(&first);
        m.release(&hit.blocks);
        assert_eq!(m.used_blocks(), 0);
        assert_eq!(
            m.cached_blocks(),
            2,
            "hashed blocks stay cached after release"
        );
        assert_eq!(m.lookup_prefix(&prompt, 4).blocks, first[..2].to_vec());
    }

    #[test]
    fn eviction_takes_the_least_recently_released_block_and_forgets_its_hash() {
        let mut m = BlockManager::new(2, 1, true);
        let (mut a, mut b) = (vec![], vec![]);
        assert!(m.grow(&mut a, 1) && m.grow(&mut b, 1));
        m.register_full_blocks(&a, &[10], &mut HashChain::default());
        m.register_full_blocks(&b, &[20], &mut HashChain::default());
        m.release(&a);
        m.release(&b);
        assert_eq!(m.cached_blocks(), 2);
        let taken = m.allocate().unwrap();
        assert_eq!(taken, a[0], "oldest cached block is evicted first");
        assert!(
            m.lookup_prefix(&[10], 1).blocks.is_empty(),
            "evicted content is gone"
        );
        assert_eq!(m.lookup_prefix(&[20], 1).blocks, b);
    }

    #[test]
    fn prefix_caching_off_never_hits() {
        let mut m = BlockManager::new(4, 2, false);
        let mut a = vec![];
        assert!(m.grow(&mut a, 4));
        m.register_full_blocks(&a, &[1, 2, 3, 4], &mut HashChain::default());
        m.release(&a);
        assert_eq!(m.cached_blocks(), 0);
        assert!(m.lookup_prefix(&[1, 2, 3, 4], 4).blocks.is_empty());
    }
}
