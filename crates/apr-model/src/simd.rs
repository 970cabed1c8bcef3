//! Which x86 vector extension the host code runs with, and functions compiled once per extension.
//!
//! Rust never fuses a multiply and an add on its own and never reorders floating-point
//! arithmetic, so a loop compiled with AVX2 or AVX-512 enabled performs the same IEEE operations in
//! the same order as the portable build: it only runs more of them per instruction. Everything
//! here therefore gives the same bits at every [`Simd`]; the choice is one of speed, and
//! `APR_SIMD` makes it by hand (a check that results do not depend on it).
//!
//! [`multiversion!`] defines a function whose body is compiled for each extension and dispatched
//! by a [`Simd`] argument; the matrix products (`native/gemm.rs`) pick their register tile by it.

use std::sync::OnceLock;

/// A vector extension this CPU has. Only [`Simd::available`] and [`Simd::chosen`] make one, so
/// holding a value is proof that its instructions run here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Simd(Isa);

/// The extensions, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// The build target's baseline (SSE2 on x86-64); `f32::mul_add` is a true fused multiply-add
    /// on every target.
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Simd {
    /// The baseline every CPU of the target runs.
    pub const PORTABLE: Simd = Simd(Isa::Portable);

    /// Every extension this CPU runs, narrowest (portable) first.
    pub fn available() -> Vec<Simd> {
        let mut all = vec![Simd::PORTABLE];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Simd(Isa::Avx2));
                if is_x86_feature_detected!("avx512f") {
                    all.push(Simd(Isa::Avx512));
                }
            }
        }
        all
    }

    /// The name `APR_SIMD` takes: `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The extension the host code uses: the widest available, or the one `APR_SIMD` names. A
    /// name this CPU cannot run is a one-line warning, and the default.
    pub fn chosen() -> Simd {
        static CHOSEN: OnceLock<Simd> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Self::available();
            let widest = *available.last().expect("portable is always available");
            let Ok(name) = std::env::var("APR_SIMD") else {
                return widest;
            };
            if let Some(&simd) = available.iter().find(|s| s.name() == name) {
                return simd;
            }
            let have: Vec<&str> = available.iter().map(|s| s.name()).collect();
            eprintln!(
                "warning: APR_SIMD={name} is not available here (have: {}); using {}",
                have.join(", "),
                widest.name()
            );
            widest
        })
    }

    pub(crate) fn isa(self) -> Isa {
        self.0
    }
}

/// Defines a function whose body is compiled three times (portable, AVX2, AVX-512F) and which
/// runs the copy its first argument, a [`Simd`], names:
///
/// ```text
/// multiversion! {
///     /// Doubles every element.
///     pub(crate) fn double(simd, xs: &mut [f32]) {
///         xs.iter_mut().for_each(|x| *x *= 2.0);
///     }
/// }
/// double(Simd::chosen(), &mut xs);
/// ```
///
/// The body sees only its other arguments and module items. What it calls must be
/// `#[inline(always)]` to be compiled with the wider vectors (a call that is not inlined runs
/// the callee's portable build, with the same bits).
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($simd:ident $(, $arg:ident : $ty:ty)* $(,)?)
        $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($simd: $crate::simd::Simd $(, $arg: $ty)*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $simd.isa() {
                    // SAFETY: a `Simd` only names an extension this CPU has.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Isa::Portable => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = $simd;
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        /// A loop whose vectorised and scalar forms could differ if anything reordered or fused.
        fn scaled_sums(simd, xs: &[f32], scale: f32) -> Vec<f32> {
            let mut acc = [0.0f32; 8];
            for chunk in xs.chunks_exact(8) {
                for (a, &x) in acc.iter_mut().zip(chunk) {
                    *a = *a * scale + x * x;
                }
            }
            acc.to_vec()
        }
    }

    #[test]
    fn every_extension_gives_the_portable_bits() {
        let xs: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.4)
            .collect();
        let want = scaled_sums(Simd::PORTABLE, &xs, 0.999_37);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for simd in Simd::available() {
            let got = scaled_sums(simd, &xs, 0.999_37);
            assert_eq!(bits(&got), bits(&want), "{}", simd.name());
        }
    }

    #[test]
    fn the_available_list_starts_portable_and_holds_the_chosen_one() {
        let all = Simd::available();
        assert_eq!(all[0], Simd::PORTABLE);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        if std::env::var("APR_SIMD").is_err() {
            assert_eq!(Simd::chosen(), *all.last().unwrap());
        } else {
            assert!(all.contains(&Simd::chosen()));
        }
    }
}
