//! Countdown arithmetic, the reference's operation order, the multiply heuristic, and the exact
//! text forms of numbers, lists and operations (spec §2.1, §3.1).

/// Largest supported count of starting numbers.
pub const MAX_NUMS: usize = 6;

/// One binary operation as the traces write it: `{a}{op}{b}={result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    /// Left operand as written.
    pub a: i64,
    /// The operator: `+`, `*`, `-` or `/`.
    pub kind: u8,
    /// Right operand as written.
    pub b: i64,
    /// The result.
    pub result: i64,
}

impl Op {
    /// `0?0=0`: what a successor buffer holds before [`combine`] fills it.
    pub const ZERO: Op = Op {
        a: 0,
        kind: 0,
        b: 0,
        result: 0,
    };

    /// Appends `a+b=r` (no quotes).
    pub fn write(&self, out: &mut String) {
        push_int(out, self.a);
        out.push(self.kind as char);
        push_int(out, self.b);
        out.push('=');
        push_int(out, self.result);
    }

    /// The text `a+b=r`.
    pub fn text(&self) -> String {
        let mut s = String::with_capacity(12);
        self.write(&mut s);
        s
    }
}

/// The successors of the pair `(a, b)` in the reference's order (`combine_nums`): `a+b`, `a*b`,
/// then the subtraction of the smaller from the larger and, when exact, the division of the
/// larger by the smaller. Returns how many of `out` were filled.
#[inline]
pub fn combine(a: i64, b: i64, out: &mut [Op; 4]) -> usize {
    out[0] = Op {
        a,
        kind: b'+',
        b,
        result: a + b,
    };
    out[1] = Op {
        a,
        kind: b'*',
        b,
        result: a * b,
    };
    let (big, small) = if a <= b { (b, a) } else { (a, b) };
    out[2] = Op {
        a: big,
        kind: b'-',
        b: small,
        result: big - small,
    };
    if small != 0 && big % small == 0 {
        out[3] = Op {
            a: big,
            kind: b'/',
            b: small,
            result: big / small,
        };
        4
    } else {
        3
    }
}

/// The factors `2..=target` of the target, the anchor points of [`mult_heuristic`].
pub fn target_factors(target: i64) -> Vec<i64> {
    (2..=target.max(2)).filter(|f| target % f == 0).collect()
}

/// `Σ_n min_f |n − f|` over the factors `f` of the target (lower is better). This is what the
/// reference code computes (the paper's formula differs; spec §3.1 says follow the code).
#[inline]
pub fn mult_heuristic(nums: &[i64], factors: &[i64]) -> i64 {
    nums.iter()
        .map(|&n| {
            factors
                .iter()
                .map(|&f| (n - f).abs())
                .min()
                .unwrap_or(n.abs())
        })
        .sum()
}

/// [`mult_heuristic`] by table: the distance of every value up to the target to its nearest
/// factor. Values above the target are nearest to the target itself, its largest factor.
#[derive(Clone, Debug)]
pub struct Heuristic {
    /// The largest factor (the target itself), if the target has any factor ≥ 2.
    largest_factor: Option<i64>,
    below: Vec<i64>,
}

impl Heuristic {
    /// The table for a target.
    pub fn new(target: i64) -> Self {
        let factors = target_factors(target);
        let below = (0..=target.max(0))
            .map(|n| mult_heuristic(&[n], &factors))
            .collect();
        Heuristic {
            largest_factor: factors.last().copied(),
            below,
        }
    }

    /// The heuristic of a list of numbers.
    #[inline]
    pub fn of(&self, nums: &[i64]) -> i64 {
        nums.iter().map(|&n| self.one(n)).sum()
    }

    #[inline]
    fn one(&self, n: i64) -> i64 {
        match usize::try_from(n) {
            Ok(i) if i < self.below.len() => self.below[i],
            // Above the target (or negative, which never happens in Countdown).
            _ => self.largest_factor.map_or(n.abs(), |f| (n - f).abs()),
        }
    }
}

/// Appends a decimal integer.
#[inline(always)]
pub fn push_int(out: &mut String, n: i64) {
    // Byte pushes, not `push_str` of a formatted slice: numbers here are one to four digits,
    // and a `memcpy` call per number dominated trace writing. The rare long numbers go through
    // a separate cold function so that this one stays small enough to inline at every caller.
    #[inline(always)]
    fn digit(out: &mut String, d: u64) {
        out.push(char::from(b'0' + d as u8));
    }
    if !(0..10_000).contains(&n) {
        push_int_slow(out, n);
        return;
    }
    let v = n as u64;
    if v >= 1000 {
        digit(out, v / 1000);
    }
    if v >= 100 {
        digit(out, v / 100 % 10);
    }
    if v >= 10 {
        digit(out, v / 10 % 10);
    }
    digit(out, v % 10);
}

#[cold]
#[inline(never)]
fn push_int_slow(out: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut v = n.unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    for &d in &digits[start..] {
        out.push(char::from(d));
    }
}

/// Appends a Python list of integers: `[22, 26, 31, 53]`.
#[inline]
pub fn push_list(out: &mut String, nums: &[i64]) {
    out.push('[');
    for (i, &n) in nums.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_int(out, n);
    }
    out.push(']');
}

/// Appends a Python list of quoted operations: `['53-22=31', '31/31=1']`, or `[]`.
pub fn push_op_list<'a>(out: &mut String, ops: impl IntoIterator<Item = &'a Op>) {
    push_quoted_list(out, ops, |out, op| op.write(out));
}

/// Appends a Python list of quoted items, each written by `write`: `['a', 'b']`, or `[]`.
pub fn push_quoted_list<T>(
    out: &mut String,
    items: impl IntoIterator<Item = T>,
    mut write: impl FnMut(&mut String, T),
) {
    out.push('[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('\'');
        write(out, item);
        out.push('\'');
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_follows_the_reference_order() {
        let mut ops = [Op::ZERO; 4];
        let n = combine(31, 31, &mut ops);
        let texts: Vec<String> = ops[..n].iter().map(Op::text).collect();
        assert_eq!(texts, ["31+31=62", "31*31=961", "31-31=0", "31/31=1"]);
        let n = combine(53, 22, &mut ops);
        let texts: Vec<String> = ops[..n].iter().map(Op::text).collect();
        assert_eq!(texts, ["53+22=75", "53*22=1166", "53-22=31"]);
        let n = combine(0, 5, &mut ops);
        assert_eq!(n, 3, "no division by zero");
    }

    #[test]
    fn heuristic_matches_the_reference_formula() {
        // target 27: factors 3, 9, 27.
        let f = target_factors(27);
        assert_eq!(f, [3, 9, 27]);
        assert_eq!(mult_heuristic(&[22, 26, 31, 53], &f), 5 + 1 + 4 + 26);
        assert_eq!(target_factors(13), [13]);
        for target in 10..=100 {
            let table = Heuristic::new(target);
            let f = target_factors(target);
            for n in 0..20_000 {
                assert_eq!(table.of(&[n]), mult_heuristic(&[n], &f), "{target} {n}");
            }
        }
    }

    #[test]
    fn integers_format_like_display() {
        for n in [
            0,
            7,
            10,
            99,
            100,
            999,
            1000,
            1001,
            123_456,
            1_000_000,
            -5,
            i64::MAX,
            i64::MIN + 1,
        ] {
            let mut s = String::new();
            push_int(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }

    #[test]
    fn python_list_forms() {
        let mut s = String::new();
        push_list(&mut s, &[22, 26, 31, 53]);
        s.push(' ');
        push_op_list(
            &mut s,
            &[
                Op {
                    a: 53,
                    kind: b'-',
                    b: 22,
                    result: 31,
                },
                Op {
                    a: 31,
                    kind: b'/',
                    b: 31,
                    result: 1,
                },
            ],
        );
        s.push(' ');
        push_op_list(&mut s, &[]);
        assert_eq!(s, "[22, 26, 31, 53] ['53-22=31', '31/31=1'] []");
    }
}
