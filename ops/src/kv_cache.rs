//! The paged KV cache a rank holds: fixed-size blocks of token slots, addressed by block tables.
//!
//! As in vLLM's PagedAttention (Kwon et al., arXiv 2309.06180), a sequence's keys and values live
//! in blocks anywhere in a per-layer pool; its block table maps token `i` to slot
//! `table[i / block_size] * block_size + i % block_size`. The allocator that hands out blocks
//! belongs to whoever plans the steps (the coordinator, or a local runner); every rank holds its
//! own heads' share of every block.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// One layer's pool: `[num_blocks * block_size, kv_heads, head_dim]` for keys and for values.
pub struct LayerKv {
    pub keys: Tensor,
    pub values: Tensor,
}

/// Every layer's pool, with the geometry steps are checked against.
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let shape = [
            (num_blocks * block_size) as i64,
            kv_heads as i64,
            head_dim as i64,
        ];
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerKv {
                    keys: Tensor::f_zeros(shape, (kind, device))?,
                    values: Tensor::f_zeros(shape, (kind, device))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// Hands out cache blocks from a free list. Used by local runners; the coordinator's scheduler
/// owns the equivalent for served requests.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockAllocator {
            free: (0..num_blocks as u32).rev().collect(),
            block_size,
        }
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to hold `tokens` tokens; `false` (and no change) if the pool is too small.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let needed = self.blocks_for(tokens).saturating_sub(table.len());
        if needed > self.free.len() {
            return false;
        }
        let start = self.free.len() - needed;
        table.extend(self.free.drain(start..).rev());
        true
    }

    /// Returns `table`'s blocks to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_grows_tables_and_refuses_beyond_capacity() {
        let mut alloc = BlockAllocator::new(4, 16);
        let mut a = vec![];
        assert!(alloc.grow(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(alloc.grow(&mut a, 32), "already enough blocks");
        assert_eq!(a.len(), 2);
        let mut b = vec![];
        assert!(!alloc.grow(&mut b, 3 * 16 + 1), "needs 4 blocks, 2 free");
        assert!(b.is_empty());
        assert!(alloc.grow(&mut b, 32));
        assert_eq!(alloc.free_blocks(), 0);
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3]);
        alloc.release(&mut a);
        assert_eq!(alloc.free_blocks(), 2);
        assert!(a.is_empty());
    }
}
