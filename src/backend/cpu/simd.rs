//! SIMD on the CPU: runtime feature detection and function multiversioning.
//!
//! Kernels are written once, generic over [`Real`], as straight-line loops over slices with fixed-width
//! lane accumulators and branch-free math (the f32 `exp`/`erf` below use only arithmetic and bit tricks,
//! no libm calls). [`dispatch`] runs such a loop inside a function compiled for AVX-512, AVX2+FMA or the
//! baseline ISA, picked once at start-up, so LLVM emits the widest vectors the machine has. On aarch64
//! NEON is part of the baseline, so the baseline version is the NEON one.

use std::sync::OnceLock;

use crate::tensor::{DType, Storage};

/// Number of independent accumulators in reductions: enough lanes for one AVX-512 f32 register,
/// so a sum vectorises without reassociation that LLVM is not allowed to do on its own.
pub const LANES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    Avx512,
    Avx2Fma,
    Neon,
    Scalar,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Neon => "neon",
            SimdLevel::Scalar => "scalar",
        }
    }
}

/// The widest instruction set this CPU supports; `KDX_SIMD=avx2|scalar` caps it (to compare paths).
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect();
        match std::env::var("KDX_SIMD").as_deref() {
            Ok("scalar") => SimdLevel::Scalar,
            Ok("avx2") if detected == SimdLevel::Avx512 => SimdLevel::Avx2Fma,
            _ => detected,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
    {
        SimdLevel::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        SimdLevel::Avx2Fma
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(target_arch = "aarch64")]
fn detect() -> SimdLevel {
    SimdLevel::Neon
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}

/// Runs a block of code compiled for the best available instruction set: `simd!({ hot loop })`.
/// Use it per chunk of work inside rayon tasks, not around a rayon call (work on other threads is not
/// compiled in this context). Closures the block calls must be `#[inline(always)]` too.
macro_rules! simd {
    ($($body:tt)*) => {
        $crate::backend::cpu::simd::dispatch(#[inline(always)] || { $($body)* })
    };
}
pub(crate) use simd;

/// Runs `f` inside a function compiled for the detected instruction set. `f` must be an
/// `#[inline(always)]` closure (use [`simd!`]): LLVM only compiles its body with the wider
/// instructions if it is inlined into the target-feature function, and a large closure called from
/// three branches is otherwise kept out of line, compiled for the baseline ISA.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: the level was detected at run time, so the CPU supports these instructions.
            SimdLevel::Avx512 => return unsafe { run_avx512(f) },
            SimdLevel::Avx2Fma => return unsafe { run_avx2(f) },
            _ => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The element types CPU kernels are generic over: f32 (production) and f64 (reference for checks).
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + 'static
{
    const DTYPE: DType;
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn erf(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    /// Natural log in arithmetic only, so loops over it vectorise (f32: about 1 ulp; inputs below
    /// the smallest normal f32, zero included, are read as that value, ≈ −87.3).
    fn ln_fast(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn view(s: &Storage) -> Option<&[Self]>;
    fn view_mut(s: &mut Storage) -> Option<&mut [Self]>;
    fn wrap(v: Vec<Self>) -> Storage;
}

impl Real for f32 {
    const DTYPE: DType = DType::F32;
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> f32 {
        erf_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn ln_fast(self) -> f32 {
        ln_f32(self)
    }
    #[inline(always)]
    fn max(self, other: f32) -> f32 {
        // Plain compare-select (not f32::max) so it lowers to one vmaxps.
        if self > other {
            self
        } else {
            other
        }
    }
    fn view(s: &Storage) -> Option<&[f32]> {
        match s {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn view_mut(s: &mut Storage) -> Option<&mut [f32]> {
        match s {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<f32>) -> Storage {
        Storage::F32(v)
    }
}

impl Real for f64 {
    const DTYPE: DType = DType::F64;
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn ln_fast(self) -> f64 {
        // Floored where the f32 version is, so a zero probability means the same at either precision.
        f64::ln(self.max(f32::MIN_POSITIVE as f64))
    }
    #[inline(always)]
    fn max(self, other: f64) -> f64 {
        if self > other {
            self
        } else {
            other
        }
    }
    fn view(s: &Storage) -> Option<&[f64]> {
        match s {
            Storage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn view_mut(s: &mut Storage) -> Option<&mut [f64]> {
        match s {
            Storage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(v: Vec<f64>) -> Storage {
        Storage::F64(v)
    }
}

/// e^x for f32 in arithmetic only (Cephes-style range reduction and a degree-6 polynomial),
/// max relative error about 2 ulp on [-87, 88]; vectorises in any instruction set.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.376_26);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    p * scale
}

/// ln(x) for f32 in arithmetic only (Cephes `logf`: the mantissa reduced to [√½, √2), a degree-9
/// polynomial for ln(1 + f)). Denormals, zero and negatives are read as the smallest normal number:
/// callers use it on probabilities, where that is the honest floor of f32.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let x = if x > f32::MIN_POSITIVE {
        x
    } else {
        f32::MIN_POSITIVE
    };
    let bits = x.to_bits();
    // x = m·2^e with m in [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let f = if m < SQRT_HALF {
        e -= 1.0;
        m + m - 1.0
    } else {
        m - 1.0
    };
    let z = f * f;
    let p = 7.037_683_6e-2_f32;
    let p = p * f - 1.151_461e-1;
    let p = p * f + 1.167_699_9e-1;
    let p = p * f - 1.242_014_1e-1;
    let p = p * f + 1.424_932_3e-1;
    let p = p * f - 1.666_805_8e-1;
    let p = p * f + 2.000_071_4e-1;
    let p = p * f - 2.499_999_4e-1;
    let p = p * f + 3.333_333e-1;
    let y = f * z * p - 2.121_944_4e-4 * e - 0.5 * z;
    f + y + 0.693_359_4 * e
}

/// erf(x) for f32 in arithmetic only: Abramowitz & Stegun 7.1.26 (1.5e-7 in exact arithmetic; about
/// 6e-7 absolute once evaluated in f32, which is well inside the f32 golden tolerances).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let a = if x < 0.0 { -x } else { x };
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_f32(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// Σ a·b with [`LANES`] independent accumulators (vectorises; order fixed, so results are reproducible).
#[inline(always)]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (ac, bc) = (
            &a[c * LANES..(c + 1) * LANES],
            &b[c * LANES..(c + 1) * LANES],
        );
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut tail = T::ZERO;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().copied().sum::<T>() + tail
}

/// Σ a with [`LANES`] independent accumulators.
#[inline(always)]
pub fn sum<T: Real>(a: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let ac = &a[c * LANES..(c + 1) * LANES];
        for l in 0..LANES {
            acc[l] += ac[l];
        }
    }
    let mut tail = T::ZERO;
    for &x in &a[chunks * LANES..] {
        tail += x;
    }
    acc.iter().copied().sum::<T>() + tail
}

/// max over a non-empty slice, with lane accumulators.
#[inline(always)]
pub fn max<T: Real>(a: &[T]) -> T {
    let mut acc = [a[0]; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let ac = &a[c * LANES..(c + 1) * LANES];
        for l in 0..LANES {
            acc[l] = acc[l].max(ac[l]);
        }
    }
    let mut m = a[chunks * LANES..].iter().fold(a[0], |m, &x| m.max(x));
    for &x in &acc {
        m = m.max(x);
    }
    m
}

/// Σ f(a[i]) with [`LANES`] independent accumulators.
#[inline(always)]
pub fn sum_map<T: Real>(a: &[T], f: impl Fn(T) -> T) -> T {
    sum_map2(a, a, |x, _| f(x))
}

/// Elements per block of the mapped reductions below: a stack buffer that stays in L1.
const MAP_BLOCK: usize = 256;

/// Adds `x` into lane accumulators (fixed order, so results are reproducible).
#[inline(always)]
fn add_lanes<T: Real>(acc: &mut [T; LANES], x: &[T]) {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += v;
    }
}

/// Σ f(a[i], b[i]). Mapped a block at a time into a buffer, then summed in lanes: a plain map loop
/// is what LLVM's loop vectoriser handles (an expensive `f`, such as `exp`, written straight into
/// lane accumulators ends up scalar).
#[inline(always)]
pub fn sum_map2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; LANES];
    let mut buf = [T::ZERO; MAP_BLOCK];
    for (ac, bc) in a.chunks(MAP_BLOCK).zip(b.chunks(MAP_BLOCK)) {
        let out = &mut buf[..ac.len()];
        for ((o, &x), &y) in out.iter_mut().zip(ac).zip(bc) {
            *o = f(x, y);
        }
        add_lanes(&mut acc, out);
    }
    acc.iter().copied().sum()
}

/// In place `a[i] = f(a[i], b[i]).0`, returning Σ `f(a[i], b[i]).1` (blocked as [`sum_map2`]).
#[inline(always)]
pub fn update_sum<T: Real>(a: &mut [T], b: &[T], f: impl Fn(T, T) -> (T, T)) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::ZERO; LANES];
    let mut buf = [T::ZERO; MAP_BLOCK];
    for (ac, bc) in a.chunks_mut(MAP_BLOCK).zip(b.chunks(MAP_BLOCK)) {
        let terms = &mut buf[..ac.len()];
        for ((x, &y), o) in ac.iter_mut().zip(bc).zip(terms.iter_mut()) {
            let (v, term) = f(*x, y);
            *x = v;
            *o = term;
        }
        add_lanes(&mut acc, terms);
    }
    acc.iter().copied().sum()
}

/// In place: x ← exp(x − shift); returns Σ of the new values.
#[inline(always)]
pub fn exp_shifted_sum<T: Real>(x: &mut [T], shift: T) -> T {
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
    }
    sum(x)
}

/// A pointer that may be sent to other threads: kernels use it to write disjoint regions of one
/// output from rayon tasks. Every use states why the regions do not overlap.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer. Closures call this (rather than reading `.0`) so they capture the whole
    /// `SendPtr`, which is `Send`, instead of the raw field, which is not.
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_f32(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-200.0), exp_f32(-87.336_55));
    }

    #[test]
    fn fast_ln_matches_std() {
        let mut worst = 0.0f64;
        let mut x = 1.0e-37f32;
        while x < 1.0e37 {
            let exact = (x as f64).ln();
            worst = worst.max((ln_f32(x) as f64 - exact).abs() / exact.abs().max(1.0));
            x *= 1.000_37;
        }
        assert!(worst < 3e-7, "worst error {worst}");
        // Either side of the √½ split of the mantissa.
        let sqrt_half = std::f32::consts::FRAC_1_SQRT_2;
        let below = f32::from_bits(sqrt_half.to_bits() - 1);
        for x in [0.5f32, 0.7, below, sqrt_half, 1.0, 1.5, 2.0, 0.999_999_9] {
            assert!((ln_f32(x) as f64 - (x as f64).ln()).abs() < 2e-7, "ln({x})");
        }
        assert_eq!(ln_f32(0.0), ln_f32(f32::MIN_POSITIVE));
    }

    #[test]
    fn fast_erf_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((erf_f32(x) as f64 - libm::erf(x as f64)).abs());
            x += 0.00731;
        }
        assert!(worst < 1e-6, "worst abs error {worst}");
    }

    #[test]
    fn reductions_match_naive() {
        let a: Vec<f64> = (0..37)
            .map(|i| ((i * 7919) % 101) as f64 / 13.0 - 3.0)
            .collect();
        let b: Vec<f64> = (0..37)
            .map(|i| ((i * 104729) % 97) as f64 / 11.0 - 4.0)
            .collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-10);
        assert!((sum(&a) - a.iter().sum::<f64>()).abs() < 1e-10);
        assert_eq!(max(&a), a.iter().cloned().fold(f64::MIN, f64::max));
    }
}
