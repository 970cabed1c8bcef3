//! A random number generator that draws exactly what CPython's `random` module draws.
//!
//! The reference solvers are driven by Python's Mersenne Twister (`random.random`,
//! `random.shuffle`, `random.randint`, `random.choice`). Reproducing its streams lets our solver
//! output be compared byte for byte with the reference's for the same seed, which is how the
//! golden tests pin the solver semantics. It is fast enough for the hot path (a few ns a draw).

const N: usize = 624;
/// Streams seeded side by side by [`PyRandom::new_lanes`].
pub const LANES: usize = 8;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 with CPython's seeding and derived draws.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish()
    }
}

impl PyRandom {
    /// Same stream as `random.seed(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        let [rng] = Self::new_lanes([seed]);
        rng
    }

    /// `L` streams at once, each the same as [`PyRandom::new`] of its seed (CPython's
    /// `init_by_array` on the seed's one or two 32-bit words). Seeding is a chain of about 1,250
    /// dependent multiplications; run side by side ([`LANES`] of them), the chains of several
    /// seeds overlap in the CPU, so each costs a fraction of a lone one.
    pub fn new_lanes<const L: usize>(seeds: [u64; L]) -> [PyRandom; L] {
        // `init_by_array` adds `key[j] + j` with `j` cycling over the key: one or two 32-bit
        // words, so the addend alternates between two values per seed.
        let mut add = [[0u32; L]; 2];
        for (lane, &seed) in seeds.iter().enumerate() {
            let (low, high) = (seed as u32, (seed >> 32) as u32);
            add[0][lane] = low;
            add[1][lane] = if high == 0 { low } else { high.wrapping_add(1) };
        }
        // Lane-major: independent scalar chains, which the CPU overlaps (a lane-minor layout
        // that invites vectorisation measured 1.5× slower without SSE4.1's `pmulld`).
        let mut rngs: [PyRandom; L] = std::array::from_fn(|_| PyRandom {
            state: *base_state(),
            index: N,
        });
        let mut i = 1;
        for step in 0..N {
            for (rng, &a) in rngs.iter_mut().zip(&add[step % 2]) {
                let s = &mut rng.state;
                let p = s[i - 1];
                s[i] = (s[i] ^ (p ^ (p >> 30)).wrapping_mul(1_664_525)).wrapping_add(a);
            }
            i += 1;
            if i >= N {
                rngs.iter_mut().for_each(|r| r.state[0] = r.state[N - 1]);
                i = 1;
            }
        }
        for _ in 0..N - 1 {
            for rng in rngs.iter_mut() {
                let s = &mut rng.state;
                let p = s[i - 1];
                s[i] = (s[i] ^ (p ^ (p >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            }
            i += 1;
            if i >= N {
                rngs.iter_mut().for_each(|r| r.state[0] = r.state[N - 1]);
                i = 1;
            }
        }
        rngs.iter_mut().for_each(|r| r.state[0] = 0x8000_0000);
        rngs
    }

    fn init_genrand(&mut self, s: u32) {
        self.state[0] = s;
        for i in 1..N {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn twist(&mut self) {
        // Three ranges instead of `% N` on every index: the compiler vectorises straight loops.
        #[inline(always)]
        fn mix(upper: u32, lower: u32, far: u32) -> u32 {
            let y = (upper & UPPER_MASK) | (lower & LOWER_MASK);
            far ^ (y >> 1) ^ (if y & 1 != 0 { MATRIX_A } else { 0 })
        }
        let s = &mut self.state;
        for k in 0..N - M {
            s[k] = mix(s[k], s[k + 1], s[k + M]);
        }
        for k in N - M..N - 1 {
            s[k] = mix(s[k], s[k + 1], s[k + M - N]);
        }
        s[N - 1] = mix(s[N - 1], s[0], s[M - 1]);
        self.index = 0;
    }

    /// One 32-bit output (`genrand_uint32`).
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.random()`: a 53-bit float in [0, 1).
    #[inline]
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.getrandbits(k)` for 1 ≤ k ≤ 32.
    #[inline]
    fn getrandbits32(&mut self, k: u32) -> u32 {
        debug_assert!((1..=32).contains(&k));
        self.next_u32() >> (32 - k)
    }

    /// `random._randbelow(n)`: uniform in [0, n) by rejection on `n.bit_length()` bits.
    #[inline]
    pub fn below(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0; // Python raises here; no caller asks for it
        }
        let k = 32 - n.leading_zeros();
        loop {
            let r = self.getrandbits32(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.randint(a, b)`, inclusive.
    pub fn randint(&mut self, a: u32, b: u32) -> u32 {
        a + self.below(b - a + 1)
    }

    /// `random.shuffle(list)`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u32 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `random.choice(list)` as an index.
    pub fn choice_index(&mut self, len: usize) -> usize {
        self.below(len as u32) as usize
    }
}

/// Every seed starts from the same `init_genrand(19650218)` state: computed once.
fn base_state() -> &'static [u32; N] {
    static BASE: std::sync::OnceLock<[u32; N]> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let mut base = PyRandom {
            state: [0; N],
            index: N,
        };
        base.init_genrand(19_650_218);
        base.state
    })
}

/// Maps `f(i, stream i)` over `0..count` in parallel, in order, where stream `i` is
/// `PyRandom::new(seed_of(i))`; streams are seeded [`LANES`] at a time.
pub fn par_map_seeded<T: Send>(
    count: usize,
    seed_of: impl Fn(u64) -> u64 + Sync,
    f: impl Fn(usize, &mut PyRandom) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    (0..count.div_ceil(LANES))
        .into_par_iter()
        .flat_map_iter(|group| {
            let first = group * LANES;
            let rngs =
                PyRandom::new_lanes::<LANES>(std::array::from_fn(|k| seed_of((first + k) as u64)));
            let f = &f;
            rngs.into_iter()
                .take(count - first)
                .enumerate()
                .map(move |(k, mut rng)| f(first + k, &mut rng))
        })
        .collect()
}

/// SplitMix64: derives independent per-item seeds from a base seed, so that item `i`'s stream
/// does not depend on how items are spread over threads.
pub fn derive_seed(base: u64, stream: u64, index: u64) -> u64 {
    let mut z = base
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // Python seeds are non-negative integers of any size; keep 63 bits so the value is the same
    // whether a Python script reads it as a signed or an unsigned 64-bit number.
    (z ^ (z >> 31)) >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11 for the same calls.
    #[test]
    fn matches_cpython() {
        let mut r = PyRandom::new(12345);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [1_789_368_711, 3_146_859_322, 43_676_229]
        );
        assert_eq!(r.random(), 0.8201747225612886);
        let mut list: Vec<u32> = (0..10).collect();
        r.shuffle(&mut list);
        assert_eq!(list, [6, 0, 8, 1, 7, 9, 2, 3, 5, 4]);
        let ints: Vec<u32> = (0..5).map(|_| r.randint(1, 10)).collect();
        assert_eq!(ints, [7, 5, 9, 3, 10]);
        assert_eq!(PyRandom::new(0).random(), 0.8444218515250481);
        // Two-word keys (seeds of 2^32 and more, as `derive_seed` makes).
        let mut r = PyRandom::new(7 << 40 | 3);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [3_479_967_204, 1_161_384_718, 3_372_813_660]
        );
        let mut r = PyRandom::new(u64::MAX >> 1);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [1_359_979_423, 2_819_855_560, 2_711_238_091]
        );
    }

    #[test]
    fn lanes_seed_like_one_at_a_time() {
        // Zero, one-word and two-word keys side by side.
        let seeds = [
            0,
            1,
            12345,
            u32::MAX as u64,
            1 << 32,
            7 << 40 | 3,
            u64::MAX >> 1,
            99,
        ];
        for (lane, mut rng) in PyRandom::new_lanes(seeds).into_iter().enumerate() {
            let mut one = PyRandom::new(seeds[lane]);
            for _ in 0..700 {
                assert_eq!(rng.next_u32(), one.next_u32(), "seed {}", seeds[lane]);
            }
        }
        let firsts = par_map_seeded(19, |i| i * 3 + 1, |i, rng| (i, rng.next_u32()));
        for (i, (index, first)) in firsts.into_iter().enumerate() {
            assert_eq!(index, i);
            assert_eq!(first, PyRandom::new(i as u64 * 3 + 1).next_u32());
        }
    }
}
