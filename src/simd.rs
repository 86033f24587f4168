//! Run-time dispatch of hot loops to AVX2 where the CPU has it.
//!
//! [`multiversion!`](crate::simd::multiversion) compiles one loop body twice: for the baseline
//! target and with AVX2 enabled (checked at run time). Results are identical: the bodies use
//! only exact integer operations and IEEE single operations that round the same at any vector
//! width (Rust never contracts `a * b + c` into an FMA), so only the speed changes.

/// Defines `fn NAME(args) -> RET` whose body runs compiled for AVX2 when the CPU has it.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;
