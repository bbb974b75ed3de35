#!/usr/bin/env python3
"""StackWise's patch of candle-core 0.11.1's CPU matmul (src/cpu_backend/mod.rs, the gemm path):
batched products of small matrices (attention's per-head scores and mixing) run one batch per
task on all cores, each gemm single-threaded, instead of one gemm after another each split over
all cores; and the destination is no longer zero-filled before gemm overwrites it. See
third_party/README.md. Usage: patch_candle_matmul.py third_party/candle-core/src/cpu_backend/mod.rs"""
import sys

path = sys.argv[1]
src = open(path).read()

old_alloc = """        let mut dst = vec![T::zero(); b * m * n];
        let num_threads = crate::utils::get_num_threads();"""
new_alloc = """        // StackWise patch: gemm writes every element (read_dst is false), so the destination
        // is not zero-filled first; its length is set once the products are written.
        let mut dst: Vec<T> = Vec::with_capacity(b * m * n);
        let num_threads = crate::utils::get_num_threads();"""
assert src.count(old_alloc) == 1, "allocation site not found"
src = src.replace(old_alloc, new_alloc)

old_loop_head = """        for step in 0..b {
            let lhs_p = &lhs[step * a_skip..];
            let rhs_p = &rhs[step * b_skip..];
            let dst_p = &mut dst[step * c_skip..];
            unsafe {
                gemm(
                    /* m: usize = */ m,"""
new_loop_head = """        // StackWise patch: a batch of small products runs one product per task on all cores,
        // each single-threaded (gemm's split of one small product costs more in hand-offs than
        // it gains). gemm's result does not depend on its parallelism (it splits rows and
        // columns, never the k sum), so the numbers are the same either way.
        let dst_ptr = SendPtr(dst.as_mut_ptr());
        let run = |step: usize, parallelism: Parallelism| {
            let lhs_p = &lhs[step * a_skip..];
            let rhs_p = &rhs[step * b_skip..];
            // SAFETY: batch `step` writes only its own m * n block of the allocation.
            let dst_p = unsafe { dst_ptr.get().add(step * c_skip) };
            unsafe {
                gemm(
                    /* m: usize = */ m,"""
assert src.count(old_loop_head) == 1, "gemm loop not found"
src = src.replace(old_loop_head, new_loop_head)

old_dst_arg = """                    /* dst: *mut T = */ dst_p.as_mut_ptr(),
                    /* dst_cs: isize = */ dst_cs as isize,
                    /* dst_rs: isize = */ dst_rs as isize,
                    /* read_dst: bool = */ false,"""
new_dst_arg = """                    /* dst: *mut T = */ dst_p,
                    /* dst_cs: isize = */ dst_cs as isize,
                    /* dst_rs: isize = */ dst_rs as isize,
                    /* read_dst: bool = */ false,"""
assert src.count(old_dst_arg) == 1
src = src.replace(old_dst_arg, new_dst_arg)

old_tail = """                    /* conj_rhs: bool = */ false,
                    parallelism,
                )
            }
        }
        Ok(dst)
    }"""
new_tail = """                    /* conj_rhs: bool = */ false,
                    parallelism,
                )
            }
        };
        if b > 1 && num_threads > 1 && m * n * k <= SMALL_GEMM {
            (0..b)
                .into_par_iter()
                .for_each(|step| run(step, Parallelism::None));
        } else {
            for step in 0..b {
                run(step, parallelism);
            }
        }
        // SAFETY: the b products above wrote all b * m * n elements.
        unsafe { dst.set_len(b * m * n) };
        Ok(dst)
    }"""
assert src.count(old_tail) == 1
src = src.replace(old_tail, new_tail)

old_impl = "impl Map2 for MatMul {"
new_impl = """/// StackWise patch: the largest m * n * k of a batched product that runs one batch per task
/// (a 256 x 256 x 64 attention product is 4M).
const SMALL_GEMM: usize = 1 << 23;

/// StackWise patch: the destination pointer, shared by the tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: each task writes a disjoint block of the destination (see `MatMul::f`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

impl Map2 for MatMul {"""
assert src.count(old_impl) == 1
src = src.replace(old_impl, new_impl)
open(path, "w").write(src)
