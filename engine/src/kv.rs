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

/// No page: the end of the LRU list, or a table entry whose page was let go.
const NIL: u32 = u32::MAX;

/// A sequence's pages and how many of its positions hold computed keys and values.
#[derive(Debug)]
pub struct SeqPages {
    /// One page table per layer group. Entries past `len` (rounded up to whole pages)
    /// are pages reserved for writes about to happen, held by this sequence alone;
    /// entries before a windowed group's window are `NIL` once let go.
    pub tables: Vec<Vec<u32>>,
    /// Positions `0..len` are computed.
    pub len: usize,
    /// Prefix key of each full page `0..len / page_size` (the same for every group).
    keys: Vec<u64>,
}

impl SeqPages {
    /// Pages held, over every group (shared ones included).
    pub fn held(&self) -> usize {
        self.tables.iter().flatten().filter(|&&p| p != NIL).count()
    }

    /// The first page of a group's table that the sequence still holds.
    pub fn first_held(&self, group: usize) -> usize {
        self.tables[group].iter().take_while(|&&p| p == NIL).count()
    }

    /// Appends each group's table for positions `0..end`, one after another, as a
    /// forward pass reads them: pages let go read as page 0 (never attended).
    pub fn tables_for(&self, end: usize, page_size: usize, out: &mut Vec<u32>) {
        let n = end.div_ceil(page_size);
        for table in &self.tables {
            out.extend(table[..n].iter().map(|&p| if p == NIL { 0 } else { p }));
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
    /// The attention window of each layer group (see `kiln_models::KvLayout`).
    windows: Vec<Option<usize>>,
    /// Sequences holding each page.
    refs: Vec<u32>,
    free: Vec<u32>,
    prefix_reuse: bool,
    /// The prefix key of each keyed page, with its group.
    key: Vec<Option<(u64, usize)>>,
    /// The key of the page before each keyed page (0 for a first page), and its tokens:
    /// a lookup checks both, so a hash collision can never hand out a wrong page.
    parent: Vec<u64>,
    tokens: Vec<u32>,
    index: HashMap<(u64, usize), u32>,
    /// Doubly linked LRU list of keyed pages no sequence holds, oldest at `head`.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    cached: usize,
}

impl PagePool {
    /// A pool of `n_pages` pages for sequences with one page table per entry of
    /// `windows`: each group's window, or `None` for groups that see every position.
    pub fn new(n_pages: usize, page_size: usize, prefix_reuse: bool, windows: Vec<Option<usize>>) -> Self {
        assert!(
            page_size > 0 && n_pages < NIL as usize && !windows.is_empty(),
            "page pool geometry"
        );
        PagePool {
            page_size,
            windows,
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

    /// Page tables per sequence: one per layer group.
    pub fn groups(&self) -> usize {
        self.windows.len()
    }

    /// An empty sequence with room for `positions` without growing.
    pub fn new_seq(&self, positions: usize) -> SeqPages {
        let n = positions.div_ceil(self.page_size) + 1;
        SeqPages {
            tables: self.windows.iter().map(|_| Vec::with_capacity(n)).collect(),
            len: 0,
            keys: Vec::with_capacity(n),
        }
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

    /// The first page a group with `window` needs for the next pass of a sequence of
    /// `len` computed positions: its first query (at `len`) sees `len + 1 - window ..`.
    fn first_needed(&self, window: Option<usize>, len: usize) -> usize {
        window.map_or(0, |w| (len + 1).saturating_sub(w) / self.page_size)
    }

    /// Gives an empty sequence the cached pages of the longest prefix of `tokens` made of
    /// whole pages, leaving at least one token to compute (its logits are needed): every
    /// page of groups without a window, the pages of the last window of the others.
    /// Returns the positions now computed.
    pub fn attach_prefix(&mut self, seq: &mut SeqPages, tokens: &[u32]) -> usize {
        assert!(
            seq.len == 0 && seq.tables.iter().all(Vec::is_empty),
            "attach_prefix: the sequence is not empty"
        );
        if !self.prefix_reuse {
            return 0;
        }
        let ps = self.page_size;
        // The cached page of each group for each whole page of the prefix, if any.
        let mut keys = Vec::new();
        let mut found: Vec<Vec<Option<u32>>> = vec![Vec::new(); self.windows.len()];
        let mut parent = 0;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(ps) {
            let key = chain(parent, chunk);
            for (g, pages) in found.iter_mut().enumerate() {
                let page = self.index.get(&(key, g)).copied().filter(|&page| {
                    let p = page as usize;
                    self.parent[p] == parent && self.tokens[p * ps..(p + 1) * ps] == *chunk
                });
                pages.push(page);
            }
            keys.push(key);
            parent = key;
        }
        // The longest prefix whose needed pages are all there.
        let mut n = keys.len();
        loop {
            let complete = self.windows.iter().zip(&found).all(|(&window, pages)| {
                let first = self.first_needed(window, n * ps);
                pages[first.min(n)..n].iter().all(Option::is_some)
            });
            if complete {
                break;
            }
            n -= 1;
        }
        for (g, pages) in found.iter().enumerate() {
            let first = self.first_needed(self.windows[g], n * ps).min(n);
            seq.tables[g].extend(std::iter::repeat_n(NIL, first));
            for page in pages[first..n].iter().map(|p| p.expect("checked")) {
                self.retain(page);
                seq.tables[g].push(page);
            }
        }
        seq.keys.extend_from_slice(&keys[..n]);
        seq.len = n * ps;
        seq.len
    }

    /// Makes positions `seq.len..end` writable: pages to cover them, and a private copy
    /// of any page among them that is shared or keyed. Copies to make before the write
    /// are appended to `copies`. On `Exhausted` nothing changes.
    pub fn reserve(&mut self, seq: &mut SeqPages, end: usize, copies: &mut Vec<PageCopy>) -> Result<(), Exhausted> {
        let ps = self.page_size;
        if end <= seq.len {
            return Ok(());
        }
        let (first, last) = (seq.len / ps, (end - 1) / ps);
        // Count first: a sequence whose shared page had moved to a fresh one without its
        // rows copied (the copy dropped with a failed step) would read garbage.
        let wanted: usize = seq
            .tables
            .iter()
            .map(|table| {
                let shared = table[first.min(table.len())..table.len().min(last + 1)]
                    .iter()
                    .filter(|&&p| self.refs[p as usize] > 1)
                    .count();
                shared + (last + 1).saturating_sub(table.len())
            })
            .sum();
        if wanted > self.free.len() + self.cached {
            return Err(Exhausted);
        }
        for table in &mut seq.tables {
            for i in first..table.len().min(last + 1) {
                let page = table[i];
                let p = page as usize;
                if self.refs[p] == 1 && self.key[p].is_none() {
                    continue;
                }
                if self.refs[p] == 1 {
                    // Its only holder rewrites it: the key no longer describes it.
                    self.unkey(page);
                    continue;
                }
                let fresh = self.alloc().expect("counted");
                // Rows below len are computed and must come along; a page wholly past
                // len holds nothing yet.
                if i * ps < seq.len {
                    copies.push((page, fresh));
                }
                self.release_page(page);
                table[i] = fresh;
            }
            while table.len() <= last {
                let fresh = self.alloc().expect("counted");
                table.push(fresh);
            }
        }
        Ok(())
    }

    /// Records positions `seq.len..end` (whose pages `reserve` made writable) as
    /// computed, for a sequence whose tokens are `tokens` (at least `end` of them), keys
    /// the pages this completes, and lets go of the pages no later query of a windowed
    /// group sees.
    pub fn commit(&mut self, seq: &mut SeqPages, end: usize, tokens: &[u32]) {
        let ps = self.page_size;
        assert!(
            end >= seq.len && end <= tokens.len() && seq.tables.iter().all(|t| end.div_ceil(ps) <= t.len()),
            "commit past the reservation"
        );
        seq.len = end;
        if self.prefix_reuse {
            while seq.keys.len() < end / ps {
                let i = seq.keys.len();
                let parent = if i == 0 { 0 } else { seq.keys[i - 1] };
                let chunk = &tokens[i * ps..(i + 1) * ps];
                let key = chain(parent, chunk);
                seq.keys.push(key);
                for (g, table) in seq.tables.iter().enumerate() {
                    let page = table[i];
                    let p = page as usize;
                    // A page already keyed (shared from the cache) keeps its key; a prefix
                    // that another page already holds is not keyed twice.
                    if page != NIL && self.key[p].is_none() && !self.index.contains_key(&(key, g)) {
                        self.key[p] = Some((key, g));
                        self.parent[p] = parent;
                        self.tokens[p * ps..(p + 1) * ps].copy_from_slice(chunk);
                        self.index.insert((key, g), page);
                    }
                }
            }
        }
        self.let_go_passed(seq);
    }

    /// `commit` for a sequence restored from a file whose rows of group `g` start at
    /// position `restored_from[g]`: pages before what the windows need are let go
    /// unkeyed, and a page holding rows that were not restored is not offered as a prefix.
    pub fn commit_restored(&mut self, seq: &mut SeqPages, end: usize, tokens: &[u32], restored_from: &[usize]) {
        seq.len = end;
        self.let_go_passed(seq);
        self.commit(seq, end, tokens);
        for (g, &from) in restored_from.iter().enumerate() {
            let first = seq.first_held(g);
            for &page in seq.tables[g]
                .iter()
                .skip(first)
                .take(from.div_ceil(self.page_size).saturating_sub(first))
            {
                self.unkey(page);
            }
        }
    }

    /// Lets go of the pages no query of a windowed group sees from `seq.len` on.
    fn let_go_passed(&mut self, seq: &mut SeqPages) {
        for (g, table) in seq.tables.iter_mut().enumerate() {
            let first = self.first_needed(self.windows[g], seq.len);
            self.let_go(table, first);
        }
    }

    /// Lets go of a table's pages before `first` (they may be keyed and cached).
    fn let_go(&mut self, table: &mut [u32], first: usize) {
        for entry in table.iter_mut().take(first).rev() {
            if *entry == NIL {
                // Earlier pages were let go before.
                break;
            }
            self.release_page(*entry);
            *entry = NIL;
        }
    }

    /// Forgets positions from `len` on (keeping the pages that still hold earlier ones).
    /// Where a windowed group has let go of pages the positions up to `len` need, no
    /// earlier length is usable either: the sequence is emptied and must be recomputed.
    pub fn truncate(&mut self, seq: &mut SeqPages, len: usize) {
        let ps = self.page_size;
        let len = len.min(seq.len);
        for table in &mut seq.tables {
            for page in table.drain(len.div_ceil(ps)..) {
                if page != NIL {
                    self.release_page(page);
                }
            }
        }
        seq.keys.truncate(len / ps);
        seq.len = len;
        let intact = self.windows.iter().zip(&seq.tables).all(|(&window, table)| {
            let first = self.first_needed(window, len);
            table[first.min(table.len())..].iter().all(|&p| p != NIL)
        });
        if !intact {
            self.release(seq);
        }
    }

    /// A second sequence with the same computed positions, sharing every page.
    pub fn fork(&mut self, seq: &SeqPages) -> SeqPages {
        let n = seq.len.div_ceil(self.page_size);
        let mut copy = self.new_seq(seq.tables[0].capacity() * self.page_size);
        for (to, from) in copy.tables.iter_mut().zip(&seq.tables) {
            to.extend_from_slice(&from[..n]);
            for &page in to.iter().filter(|&&p| p != NIL) {
                self.refs[page as usize] += 1;
            }
        }
        copy.keys.extend_from_slice(&seq.keys);
        copy.len = seq.len;
        copy
    }

    /// Lets go of every page of a sequence, leaving it empty.
    pub fn release(&mut self, seq: &mut SeqPages) {
        for table in &mut seq.tables {
            for page in table.drain(..).filter(|&p| p != NIL) {
                self.release_page(page);
            }
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
            for (g, (&window, table)) in self.windows.iter().zip(&s.tables).enumerate() {
                if table.len() < s.len.div_ceil(self.page_size) {
                    return Err(format!(
                        "a table of {} pages does not cover {} positions",
                        table.len(),
                        s.len
                    ));
                }
                // What the next pass reads is held; what no query reads is let go.
                let first = self.first_needed(window, s.len);
                let held = s.first_held(g);
                if held != first.min(table.len()) {
                    return Err(format!(
                        "a table holds pages from {held}, the next pass needs them from {first}"
                    ));
                }
                for &p in table.iter().filter(|&&p| p != NIL) {
                    refs[p as usize] += 1;
                }
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
        let mut pool = PagePool::new(8, 4, true, vec![None]);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = pool.new_seq(16);
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
        let mut b = pool.new_seq(16);
        // Two whole pages match; the third position block differs.
        let mut other = tokens.clone();
        other[9] = 99;
        assert_eq!(pool.attach_prefix(&mut b, &other), 8);
        assert_eq!(pool.counts().cached, 0);
        // A prompt of exactly 8 tokens reuses one page: one token must stay to compute.
        let mut c = pool.new_seq(16);
        assert_eq!(pool.attach_prefix(&mut c, &tokens[..8]), 4);
        pool.check(&[&b, &c]).unwrap();
    }

    #[test]
    fn a_fork_shares_until_it_writes() {
        let mut pool = PagePool::new(8, 4, false, vec![None]);
        let tokens: Vec<u32> = (0..6).collect();
        let mut a = pool.new_seq(16);
        run(&mut pool, &mut a, &tokens);
        let mut b = pool.fork(&a);
        assert_eq!(pool.counts().used, 2);
        // The shared partial page is copied on b's first write; the full one stays shared.
        let copies = run(&mut pool, &mut b, &[0, 1, 2, 3, 4, 5, 7]);
        assert_eq!(copies, vec![(a.tables[0][1], b.tables[0][1])]);
        assert_eq!(pool.counts().used, 3);
        assert_eq!(a.tables[0][0], b.tables[0][0]);
        // a now writes its own partial page in place.
        assert!(run(&mut pool, &mut a, &[0, 1, 2, 3, 4, 5, 6]).is_empty());
        pool.check(&[&a, &b]).unwrap();
    }

    #[test]
    fn exhaustion_is_reported_and_eviction_takes_the_oldest() {
        let mut pool = PagePool::new(3, 2, true, vec![None]);
        let mut a = pool.new_seq(16);
        run(&mut pool, &mut a, &[1, 2, 3, 4]);
        let mut b = pool.new_seq(16);
        run(&mut pool, &mut b, &[5, 6]);
        let mut c = pool.new_seq(16);
        assert_eq!(pool.reserve(&mut c, 4, &mut Vec::new()), Err(Exhausted));
        pool.release(&mut c);
        pool.release(&mut a);
        // a's pages are cached; c takes the oldest one first.
        let first_of_a = 0;
        let mut d = pool.new_seq(16);
        pool.reserve(&mut d, 2, &mut Vec::new()).unwrap();
        assert_eq!(d.tables[0], vec![first_of_a]);
        pool.check(&[&b, &d]).unwrap();
        let mut e = pool.new_seq(16);
        assert_eq!(
            pool.attach_prefix(&mut e, &[1, 2, 3, 4, 9]),
            0,
            "the first page was evicted"
        );
    }

    /// Runs a sequence's pending tokens as a forward pass would against `rows` (each
    /// page's rows, holding the token written there): reserve, make the copies, write
    /// every group's rows, commit. Returns false if the pool ran dry.
    fn grow(pool: &mut PagePool, rows: &mut [u32], seq: &mut SeqPages, tokens: &[u32]) -> bool {
        let ps = pool.page_size();
        let mut copies = Vec::new();
        if pool.reserve(seq, tokens.len(), &mut copies).is_err() {
            return false;
        }
        for (from, to) in copies {
            assert_ne!(from, to);
            let (from, to) = (from as usize * ps, to as usize * ps);
            rows.copy_within(from..from + ps, to);
        }
        for table in &seq.tables {
            for pos in seq.len..tokens.len() {
                rows[table[pos / ps] as usize * ps + pos % ps] = tokens[pos];
            }
        }
        pool.commit(seq, tokens.len(), tokens);
        true
    }

    /// Many sequences starting, forking, growing, rewinding and ending at random: the
    /// pool never hands out more pages than it has, its books always balance, and every
    /// row a sequence's next pass would read holds that sequence's token, in every group:
    /// no page is shared, reused or let go while someone still reads it.
    fn random_lifecycles(windows: Vec<Option<usize>>) {
        let mut rng = 0x1234_5678u64;
        let mut next = move |n: usize| {
            rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % n as u64) as usize
        };
        const PAGES: usize = 60;
        let ps = 4;
        let mut pool = PagePool::new(PAGES, ps, true, windows.clone());
        let mut rows = vec![u32::MAX; PAGES * ps];
        let mut seqs: Vec<(SeqPages, Vec<u32>)> = Vec::new();
        let (mut exhausted, mut let_go) = (0, 0);
        for _ in 0..20_000 {
            match next(6) {
                0 if seqs.len() < 12 => {
                    // A new sequence whose prompt starts like one of a few.
                    let mut tokens: Vec<u32> = (0..next(20) as u32 + 1).map(|i| i % 7 + next(2) as u32).collect();
                    tokens[0] = next(3) as u32;
                    let mut s = pool.new_seq(64);
                    pool.attach_prefix(&mut s, &tokens);
                    if !grow(&mut pool, &mut rows, &mut s, &tokens) {
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
                    // Up to 48 positions: long enough for the windows to move on.
                    for _ in 0..next(9) + 1 {
                        if t.len() < 48 {
                            t.push(next(5) as u32);
                        }
                    }
                    if !grow(&mut pool, &mut rows, s, t) {
                        exhausted += 1;
                    }
                }
                _ => {}
            }
            let live: Vec<&SeqPages> = seqs.iter().map(|(s, _)| s).collect();
            pool.check(&live).unwrap();
            let c = pool.counts();
            assert_eq!(c.used + c.cached + c.free, PAGES);
            for (s, t) in &seqs {
                for (g, table) in s.tables.iter().enumerate() {
                    let first = s.first_held(g);
                    let_go += first;
                    for pos in first * ps..s.len {
                        let page = table[pos / ps] as usize;
                        assert_eq!(rows[page * ps + pos % ps], t[pos], "group {g} row {pos}");
                    }
                }
            }
        }
        assert!(exhausted > 0, "the test never ran the pool dry");
        assert_eq!(let_go > 0, windows.iter().any(Option::is_some));
    }

    #[test]
    fn random_lifecycles_keep_the_books() {
        random_lifecycles(vec![None]);
    }

    /// As above with Gemma 3's kind of layout: groups without a window beside groups
    /// that let go of pages their window has passed.
    #[test]
    fn random_lifecycles_with_windows_keep_the_books() {
        random_lifecycles(vec![None, Some(6), Some(6)]);
    }

    #[test]
    fn windowed_groups_let_go_of_passed_pages_and_prefixes_need_the_last_window() {
        // Group 0 sees everything, group 1 the last 6 positions; pages of 4.
        let mut pool = PagePool::new(16, 4, true, vec![None, Some(6)]);
        let mut rows = vec![0; 64];
        let tokens: Vec<u32> = (0..14).collect();
        let mut a = pool.new_seq(16);
        assert!(grow(&mut pool, &mut rows, &mut a, &tokens));
        // Position 14's query sees 9..=14: pages 0 and 1 of group 1 are passed.
        assert_eq!(a.first_held(0), 0);
        assert_eq!(a.first_held(1), 2);
        assert_eq!(a.held(), 4 + 2);
        // A fork shares what is held, holes included.
        let mut b = pool.fork(&a);
        assert_eq!(b.tables, a.tables);
        pool.release(&mut b);
        // Rewound to 12, position 12's query would see 7..=12, on group 1's page 1, which
        // was let go: the sequence must be recomputed from nothing.
        pool.truncate(&mut a, 12);
        assert_eq!(a.len, 0);
        pool.check(&[&a]).unwrap();
        // Every page of the 14 tokens was keyed and cached, so a new sequence finds the
        // whole pages of the prefix again: 12 positions, both groups' last window.
        let mut c = pool.new_seq(16);
        assert_eq!(pool.attach_prefix(&mut c, &tokens), 12);
        assert_eq!(c.first_held(1), 1);
        pool.check(&[&a, &c]).unwrap();
        // Once group 1's page 1 is gone (evicted), only a shorter prefix has its window.
        pool.release(&mut c);
        pool.clear_cache();
        let mut d = pool.new_seq(16);
        assert!(grow(&mut pool, &mut rows, &mut d, &tokens));
        pool.release(&mut d);
        let page1 = pool.index[&(chain(chain(0, &tokens[..4]), &tokens[4..8]), 1)];
        pool.unkey(page1);
        pool.unlink(page1);
        pool.free.push(page1);
        let mut e = pool.new_seq(16);
        assert_eq!(
            pool.attach_prefix(&mut e, &tokens),
            4,
            "only the first page has its window"
        );
        pool.check(&[&e]).unwrap();
    }
}
