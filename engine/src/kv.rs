//! The bookkeeping of the paged key/value cache: which pages of the pool each sequence
//! uses, which are shared, which are free, and which full pages are kept for reuse by a
//! later sequence with the same token prefix.
//!
//! The pool's pages are allocated once (by the engine, on the device) from a byte
//! budget; this module never touches their contents, it only hands out page numbers and
//! says which pages to copy. A sequence's page table maps its positions to pages:
//! position `p` lives in row `p % page_size` of page `pages[p / page_size]`.
//!
//! - **Sharing.** `fork` copies a page table and counts one more reference per page. A
//!   page is written only by a sequence that holds the sole reference to it and that no
//!   prefix entry points at; any other write first copies the page (copy-on-write).
//! - **Prefix reuse.** A page whose every row is computed gets a key: a hash of its
//!   tokens chained with the key of the page before it, so equal keys mean equal whole
//!   prefixes. Keyed pages are found by later sequences whose tokens start the same way
//!   (`attach_prefix`), and when no sequence holds them any more they wait in an LRU
//!   list, to be reused or, when the free list runs dry, evicted oldest first.

use std::collections::HashMap;

/// No page: the end of the LRU list.
const NIL: u32 = u32::MAX;

/// A sequence's pages and how many of its positions hold computed keys and values.
#[derive(Debug, Default)]
pub struct SeqPages {
    /// Page table; pages past `len` (rounded up to whole pages) are reserved for writes
    /// about to happen and held by this sequence alone.
    pub pages: Vec<u32>,
    /// Positions `0..len` are computed.
    pub len: usize,
    /// Prefix key of each full page `0..len / page_size`.
    keys: Vec<u64>,
}

impl SeqPages {
    pub fn with_capacity(pages: usize) -> Self {
        SeqPages {
            pages: Vec::with_capacity(pages),
            len: 0,
            keys: Vec::with_capacity(pages),
        }
    }
}

/// Counts of the pool's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolCounts {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Held by none, kept for prefix reuse.
    pub cached: usize,
    pub free: usize,
}

/// The pool ran out of pages: every page is held by a live sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

/// A page's content to copy before a write: `(from, to)`.
pub type PageCopy = (u32, u32);

pub struct PagePool {
    page_size: usize,
    /// Sequences holding each page.
    refs: Vec<u32>,
    free: Vec<u32>,
    prefix_reuse: bool,
    /// The prefix key of each keyed page.
    key: Vec<Option<u64>>,
    /// The key of the page before each keyed page (0 for a first page), and its tokens:
    /// a lookup checks both, so a hash collision can never hand out a wrong page.
    parent: Vec<u64>,
    tokens: Vec<u32>,
    index: HashMap<u64, u32>,
    /// Doubly linked LRU list of keyed pages no sequence holds, oldest at `head`.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    cached: usize,
}

impl PagePool {
    pub fn new(n_pages: usize, page_size: usize, prefix_reuse: bool) -> Self {
        assert!(page_size > 0 && n_pages < NIL as usize, "page pool geometry");
        PagePool {
            page_size,
            refs: vec![0; n_pages],
            // Lowest page numbers first: the pool's memory is touched from its start.
            free: (0..n_pages as u32).rev().collect(),
            prefix_reuse,
            key: vec![None; n_pages],
            parent: vec![0; n_pages],
            tokens: vec![0; if prefix_reuse { n_pages * page_size } else { 0 }],
            index: HashMap::with_capacity(if prefix_reuse { n_pages } else { 0 }),
            prev: vec![NIL; n_pages],
            next: vec![NIL; n_pages],
            head: NIL,
            tail: NIL,
            cached: 0,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn counts(&self) -> PoolCounts {
        let total = self.refs.len();
        PoolCounts {
            total,
            used: total - self.free.len() - self.cached,
            cached: self.cached,
            free: self.free.len(),
        }
    }

    /// Drops every cached page (back to the free list).
    pub fn clear_cache(&mut self) {
        while self.head != NIL {
            let page = self.head;
            self.unlink(page);
            self.unkey(page);
            self.free.push(page);
        }
    }

    /// Gives an empty sequence the cached pages of the longest prefix of `tokens` made of
    /// whole pages, leaving at least one token to compute (its logits are needed).
    /// Returns the positions now computed.
    pub fn attach_prefix(&mut self, seq: &mut SeqPages, tokens: &[u32]) -> usize {
        assert!(
            seq.pages.is_empty() && seq.len == 0,
            "attach_prefix: the sequence is not empty"
        );
        if !self.prefix_reuse {
            return 0;
        }
        let ps = self.page_size;
        let mut parent = 0;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(ps) {
            let key = chain(parent, chunk);
            let Some(&page) = self.index.get(&key) else { break };
            let p = page as usize;
            if self.parent[p] != parent || self.tokens[p * ps..(p + 1) * ps] != *chunk {
                break;
            }
            self.retain(page);
            seq.pages.push(page);
            seq.keys.push(key);
            seq.len += ps;
            parent = key;
        }
        seq.len
    }

    /// Makes positions `seq.len..end` writable: pages to cover them, and a private copy
    /// of any page among them that is shared or keyed. Copies to make before the write
    /// are appended to `copies`. On `Exhausted` the sequence keeps what it had (plus any
    /// pages reserved so far, which a later call uses).
    pub fn reserve(&mut self, seq: &mut SeqPages, end: usize, copies: &mut Vec<PageCopy>) -> Result<(), Exhausted> {
        let ps = self.page_size;
        if end <= seq.len {
            return Ok(());
        }
        let (first, last) = (seq.len / ps, (end - 1) / ps);
        for i in first..seq.pages.len().min(last + 1) {
            let page = seq.pages[i];
            let p = page as usize;
            if self.refs[p] == 1 && self.key[p].is_none() {
                continue;
            }
            if self.refs[p] == 1 {
                // Its only holder rewrites it: the key no longer describes it.
                self.unkey(page);
                continue;
            }
            let fresh = self.alloc().ok_or(Exhausted)?;
            // Rows below len are computed and must come along; a page wholly past len
            // holds nothing yet.
            if i * ps < seq.len {
                copies.push((page, fresh));
            }
            self.release_page(page);
            seq.pages[i] = fresh;
        }
        while seq.pages.len() <= last {
            let fresh = self.alloc().ok_or(Exhausted)?;
            seq.pages.push(fresh);
        }
        Ok(())
    }

    /// Records positions `seq.len..end` (whose pages `reserve` made writable) as
    /// computed, for a sequence whose tokens are `tokens` (at least `end` of them), and
    /// keys the pages this completes.
    pub fn commit(&mut self, seq: &mut SeqPages, end: usize, tokens: &[u32]) {
        let ps = self.page_size;
        assert!(
            end >= seq.len && end <= tokens.len() && end.div_ceil(ps) <= seq.pages.len(),
            "commit past the reservation"
        );
        seq.len = end;
        if !self.prefix_reuse {
            return;
        }
        while seq.keys.len() < end / ps {
            let i = seq.keys.len();
            let parent = if i == 0 { 0 } else { seq.keys[i - 1] };
            let chunk = &tokens[i * ps..(i + 1) * ps];
            let key = chain(parent, chunk);
            seq.keys.push(key);
            let page = seq.pages[i];
            let p = page as usize;
            // A page already keyed (shared from the cache) keeps its key; a prefix that
            // another page already holds is not keyed twice.
            if self.key[p].is_none() && !self.index.contains_key(&key) {
                self.key[p] = Some(key);
                self.parent[p] = parent;
                self.tokens[p * ps..(p + 1) * ps].copy_from_slice(chunk);
                self.index.insert(key, page);
            }
        }
    }

    /// Forgets positions from `len` on (keeping the pages that still hold earlier ones).
    pub fn truncate(&mut self, seq: &mut SeqPages, len: usize) {
        let ps = self.page_size;
        let len = len.min(seq.len);
        for page in seq.pages.drain(len.div_ceil(ps)..) {
            self.release_page(page);
        }
        seq.keys.truncate(len / ps);
        seq.len = len;
    }

    /// A second sequence with the same computed positions, sharing every page.
    pub fn fork(&mut self, seq: &SeqPages) -> SeqPages {
        let n = seq.len.div_ceil(self.page_size);
        let mut copy = SeqPages::with_capacity(seq.pages.capacity());
        copy.pages.extend_from_slice(&seq.pages[..n]);
        copy.keys.extend_from_slice(&seq.keys);
        copy.len = seq.len;
        for &page in &copy.pages {
            self.refs[page as usize] += 1;
        }
        copy
    }

    /// Lets go of every page of a sequence, leaving it empty.
    pub fn release(&mut self, seq: &mut SeqPages) {
        for page in seq.pages.drain(..) {
            self.release_page(page);
        }
        seq.keys.clear();
        seq.len = 0;
    }

    fn release_page(&mut self, page: u32) {
        let p = page as usize;
        assert!(self.refs[p] > 0, "page {page} released more often than held");
        self.refs[p] -= 1;
        if self.refs[p] == 0 {
            if self.key[p].is_some() {
                self.push_lru(page);
            } else {
                self.free.push(page);
            }
        }
    }

    /// One more holder of a page; a cached page leaves the LRU list.
    fn retain(&mut self, page: u32) {
        let p = page as usize;
        if self.refs[p] == 0 {
            self.unlink(page);
        }
        self.refs[p] += 1;
    }

    /// A page for one holder: a free one, else the least recently cached one.
    fn alloc(&mut self) -> Option<u32> {
        let page = match self.free.pop() {
            Some(page) => page,
            None if self.head != NIL => {
                let page = self.head;
                self.unlink(page);
                self.unkey(page);
                page
            }
            None => return None,
        };
        self.refs[page as usize] = 1;
        Some(page)
    }

    fn unkey(&mut self, page: u32) {
        if let Some(key) = self.key[page as usize].take() {
            if self.index.get(&key) == Some(&page) {
                self.index.remove(&key);
            }
        }
    }

    fn push_lru(&mut self, page: u32) {
        let p = page as usize;
        self.prev[p] = self.tail;
        self.next[p] = NIL;
        if self.tail != NIL {
            self.next[self.tail as usize] = page;
        } else {
            self.head = page;
        }
        self.tail = page;
        self.cached += 1;
    }

    fn unlink(&mut self, page: u32) {
        let p = page as usize;
        let (prev, next) = (self.prev[p], self.next[p]);
        if prev != NIL {
            self.next[prev as usize] = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.prev[next as usize] = prev;
        } else {
            self.tail = prev;
        }
        self.prev[p] = NIL;
        self.next[p] = NIL;
        self.cached -= 1;
    }

    /// Checks every invariant against the sequences alive: references equal table
    /// entries, each page is in exactly one of used / cached / free, keys and the index
    /// agree. For tests.
    #[cfg(test)]
    pub fn check(&self, seqs: &[&SeqPages]) -> Result<(), String> {
        let n = self.refs.len();
        let mut refs = vec![0u32; n];
        for s in seqs {
            if s.pages.len() < s.len.div_ceil(self.page_size) {
                return Err(format!(
                    "a table of {} pages does not cover {} positions",
                    s.pages.len(),
                    s.len
                ));
            }
            for &p in &s.pages {
                refs[p as usize] += 1;
            }
        }
        if refs != self.refs {
            return Err("reference counts differ from the page tables".into());
        }
        let mut state = vec![0u8; n];
        for &p in &self.free {
            state[p as usize] += 1;
            if self.refs[p as usize] != 0 || self.key[p as usize].is_some() {
                return Err(format!("free page {p} is held or keyed"));
            }
        }
        let (mut page, mut cached) = (self.head, 0);
        while page != NIL {
            state[page as usize] += 1;
            cached += 1;
            if self.refs[page as usize] != 0 || self.key[page as usize].is_none() {
                return Err(format!("cached page {page} is held or unkeyed"));
            }
            page = self.next[page as usize];
        }
        if cached != self.cached {
            return Err("the LRU count is off".into());
        }
        for (p, &listed) in state.iter().enumerate() {
            let held = self.refs[p] > 0;
            if listed + held as u8 != 1 {
                return Err(format!("page {p} is in {} states", listed + held as u8));
            }
            if let Some(key) = self.key[p] {
                if self.index.get(&key) != Some(&(p as u32)) {
                    return Err(format!("page {p}'s key is not indexed to it"));
                }
            }
        }
        if self.index.values().any(|&p| self.key[p as usize].is_none()) {
            return Err("the index points at an unkeyed page".into());
        }
        Ok(())
    }
}

/// The key of a page: its tokens hashed onto the key of the page before it.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    // SplitMix64's finalizer per token: fast, and no two short inputs collide in practice;
    // lookups check the tokens anyway.
    let mut h = parent ^ 0x9E37_79B9_7F4A_7C15;
    for &t in tokens {
        h = (h ^ t as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
        h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 29;
    }
    // 0 stands for "no parent".
    h | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pool: &mut PagePool, seq: &mut SeqPages, tokens: &[u32]) -> Vec<PageCopy> {
        let mut copies = Vec::new();
        pool.reserve(seq, tokens.len(), &mut copies).unwrap();
        pool.commit(seq, tokens.len(), tokens);
        copies
    }

    #[test]
    fn a_prefix_is_found_after_its_sequence_ends() {
        let mut pool = PagePool::new(8, 4, true);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = SeqPages::default();
        run(&mut pool, &mut a, &tokens);
        assert_eq!(pool.counts().used, 3);
        pool.release(&mut a);
        assert_eq!(
            pool.counts(),
            PoolCounts {
                total: 8,
                used: 0,
                cached: 2,
                free: 6
            }
        );
        let mut b = SeqPages::default();
        // Two whole pages match; the third position block differs.
        let mut other = tokens.clone();
        other[9] = 99;
        assert_eq!(pool.attach_prefix(&mut b, &other), 8);
        assert_eq!(pool.counts().cached, 0);
        // A prompt of exactly 8 tokens reuses one page: one token must stay to compute.
        let mut c = SeqPages::default();
        assert_eq!(pool.attach_prefix(&mut c, &tokens[..8]), 4);
        pool.check(&[&b, &c]).unwrap();
    }

    #[test]
    fn a_fork_shares_until_it_writes() {
        let mut pool = PagePool::new(8, 4, false);
        let tokens: Vec<u32> = (0..6).collect();
        let mut a = SeqPages::default();
        run(&mut pool, &mut a, &tokens);
        let mut b = pool.fork(&a);
        assert_eq!(pool.counts().used, 2);
        // The shared partial page is copied on b's first write; the full one stays shared.
        let copies = run(&mut pool, &mut b, &[0, 1, 2, 3, 4, 5, 7]);
        assert_eq!(copies, vec![(a.pages[1], b.pages[1])]);
        assert_eq!(pool.counts().used, 3);
        assert_eq!(a.pages[0], b.pages[0]);
        // a now writes its own partial page in place.
        assert!(run(&mut pool, &mut a, &[0, 1, 2, 3, 4, 5, 6]).is_empty());
        pool.check(&[&a, &b]).unwrap();
    }

    #[test]
    fn exhaustion_is_reported_and_eviction_takes_the_oldest() {
        let mut pool = PagePool::new(3, 2, true);
        let mut a = SeqPages::default();
        run(&mut pool, &mut a, &[1, 2, 3, 4]);
        let mut b = SeqPages::default();
        run(&mut pool, &mut b, &[5, 6]);
        let mut c = SeqPages::default();
        assert_eq!(pool.reserve(&mut c, 4, &mut Vec::new()), Err(Exhausted));
        pool.release(&mut c);
        pool.release(&mut a);
        // a's pages are cached; c takes the oldest one first.
        let first_of_a = 0;
        let mut d = SeqPages::default();
        pool.reserve(&mut d, 2, &mut Vec::new()).unwrap();
        assert_eq!(d.pages, vec![first_of_a]);
        pool.check(&[&b, &d]).unwrap();
        let mut e = SeqPages::default();
        assert_eq!(
            pool.attach_prefix(&mut e, &[1, 2, 3, 4, 9]),
            0,
            "the first page was evicted"
        );
    }

    /// Many sequences starting, forking, growing, rewinding and ending at random: the
    /// pool never hands out more pages than it has and its books always balance.
    #[test]
    fn random_lifecycles_keep_the_books() {
        let mut rng = 0x1234_5678u64;
        let mut next = move |n: usize| {
            rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % n as u64) as usize
        };
        let mut pool = PagePool::new(40, 4, true);
        let mut seqs: Vec<(SeqPages, Vec<u32>)> = Vec::new();
        let mut exhausted = 0;
        for _ in 0..20_000 {
            match next(6) {
                0 if seqs.len() < 12 => {
                    // A new sequence whose prompt starts like one of a few.
                    let mut tokens: Vec<u32> = (0..next(20) as u32 + 1).map(|i| i % 7 + next(2) as u32).collect();
                    tokens[0] = next(3) as u32;
                    let mut s = SeqPages::default();
                    pool.attach_prefix(&mut s, &tokens);
                    let mut copies = Vec::new();
                    if pool.reserve(&mut s, tokens.len(), &mut copies).is_ok() {
                        pool.commit(&mut s, tokens.len(), &tokens);
                    } else {
                        exhausted += 1;
                    }
                    seqs.push((s, tokens));
                }
                1 if !seqs.is_empty() => {
                    let i = next(seqs.len());
                    let (mut s, _) = seqs.swap_remove(i);
                    pool.release(&mut s);
                }
                2 if !seqs.is_empty() && seqs.len() < 12 => {
                    let i = next(seqs.len());
                    let fork = pool.fork(&seqs[i].0);
                    let tokens = seqs[i].1[..fork.len].to_vec();
                    seqs.push((fork, tokens));
                }
                3 if !seqs.is_empty() => {
                    let i = next(seqs.len());
                    let len = next(seqs[i].0.len + 1);
                    let (s, t) = &mut seqs[i];
                    pool.truncate(s, len);
                    t.truncate(len);
                }
                _ if !seqs.is_empty() => {
                    let i = next(seqs.len());
                    let (s, t) = &mut seqs[i];
                    t.truncate(s.len);
                    for _ in 0..next(9) + 1 {
                        t.push(next(5) as u32);
                    }
                    let mut copies = Vec::new();
                    match pool.reserve(s, t.len(), &mut copies) {
                        Ok(()) => pool.commit(s, t.len(), t),
                        Err(Exhausted) => exhausted += 1,
                    }
                    for (from, to) in copies {
                        assert_ne!(from, to);
                    }
                }
                _ => {}
            }
            let live: Vec<&SeqPages> = seqs.iter().map(|(s, _)| s).collect();
            pool.check(&live).unwrap();
            let c = pool.counts();
            assert_eq!(c.used + c.cached + c.free, 40);
        }
        assert!(exhausted > 0, "the test never ran the pool dry");
    }
}
