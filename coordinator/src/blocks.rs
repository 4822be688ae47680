//! The coordinator's KV-cache block manager: which blocks of every worker's cache pool belong to
//! which sequence. Workers hold the blocks; the coordinator decides who uses them and ships block
//! tables in each step plan.

/// A free list of cache blocks.
#[derive(Debug, Clone)]
pub struct BlockManager {
    free: Vec<u32>,
    block_size: usize,
    total: usize,
}

impl BlockManager {
    pub fn new(total: usize, block_size: usize) -> Self {
        BlockManager {
            free: (0..total as u32).rev().collect(),
            block_size,
            total,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes blocks for `tokens` tokens, or `None` (taking nothing) if too few are free.
    pub fn allocate(&mut self, tokens: usize) -> Option<Vec<u32>> {
        let n = self.blocks_for(tokens);
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_whole_blocks_and_refuses_when_short() {
        let mut m = BlockManager::new(4, 16);
        let a = m.allocate(17).unwrap();
        assert_eq!(a.len(), 2);
        assert!(m.allocate(33).is_none(), "needs 3, 2 free");
        assert_eq!(m.free_blocks(), 2);
        let b = m.allocate(32).unwrap();
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort();
        assert_eq!(all, [0, 1, 2, 3]);
        m.release(a);
        assert_eq!(m.free_blocks(), 2);
    }
}
