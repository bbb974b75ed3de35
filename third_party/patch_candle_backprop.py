#!/usr/bin/env python3
"""Patch candle-core's src/backprop.rs: first gradient contribution stored, not zeros + add.
See third_party/README.md. Usage: patch_candle_backprop.py PATH/TO/backprop.rs"""
import re, sys
p = sys.argv[1]
s = open(p).read()
pat = re.compile(r'let (\w+) = grads\.or_insert\(([^)]*)\)\?;\s*\*\1 = \1\.(add|sub)\((.*?)\)\?(;?)(?=\s*\n)', re.S)
n = 0
def rep(m):
    global n
    n += 1
    var, target, op, arg, semi = m.groups()
    arg = arg.strip().replace(var + '.dims()', target + '.dims()')
    call = f'grads.accumulate({target}, {arg})?' if op == 'add' else f'grads.accumulate({target}, &({arg}).neg()?)?'
    return call + ';'
s2 = pat.sub(rep, s)
s2 = s2.replace("""    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {""", """    /// Add `grad` to the gradient of `tensor`; the first contribution is stored as is
    /// (StackWise patch: upstream allocates zeros and adds, two extra passes per node).
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                entry.insert(sum);
            }
            Entry::Vacant(entry) => {
                // Downstream backward ops (matmul) expect the contiguous layout that
                // upstream's zeros + add produced.
                entry.insert(if grad.is_contiguous() { grad.clone() } else { grad.contiguous()? });
            }
        }
        Ok(())
    }

    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {""")
# Second change: a matmul's backward computes the gradient of an argument only when the
# gradient reaches a variable through it (upstream computes both; for a frozen weight the
# second matmul, as costly as the forward one, is thrown away).
old_bwd = '''        let sorted_nodes = self.sorted_nodes();
        let mut grads = GradStore::new();'''
new_bwd = '''        let sorted_nodes = self.sorted_nodes();
        // StackWise patch: the nodes a gradient flows back through to a variable.
        let tracked: std::collections::HashSet<TensorId> =
            sorted_nodes.iter().map(|n| n.id()).collect();
        let mut grads = GradStore::new();'''
old_mm = '''                        let lhs_grad = grad.matmul(&rhs.t()?)?;
                        grads.accumulate(lhs, &lhs_grad)?;

                        let rhs_grad = lhs.t()?.matmul(&grad)?;
                        grads.accumulate(rhs, &rhs_grad)?;'''
new_mm = '''                        if tracked.contains(&lhs.id()) {
                            let lhs_grad = grad.matmul(&rhs.t()?)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if tracked.contains(&rhs.id()) {
                            let rhs_grad = lhs.t()?.matmul(&grad)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }'''
assert old_bwd in s2 and old_mm in s2, "backward() or the matmul rule changed upstream"
s2 = s2.replace(old_bwd, new_bwd).replace(old_mm, new_mm)
# Third change: `backward_with` calls a hook with each variable's gradient as soon as it is
# final (the walk reaches a variable after every node that uses it), so data parallelism can
# all-reduce gradient buckets while the rest of the backward pass runs.
old_head = '''    pub fn backward(&self) -> Result<GradStore> {
        let sorted_nodes = self.sorted_nodes();'''
new_head = '''    pub fn backward(&self) -> Result<GradStore> {
        self.backward_with(&mut |_, _| Ok(()))
    }

    /// `backward`, calling `on_final(var, grad)` for each variable as soon as its gradient is
    /// final, while the rest of the graph is still being walked (StackWise patch: lets data
    /// parallelism all-reduce gradients during the backward pass). A variable is reached after
    /// every node that uses it, so nothing adds to its gradient afterwards.
    pub fn backward_with(
        &self,
        on_final: &mut dyn FnMut(&Tensor, &Tensor) -> Result<()>,
    ) -> Result<GradStore> {
        let sorted_nodes = self.sorted_nodes();'''
old_var = '''        for node in sorted_nodes.iter() {
            if node.is_variable() {
                continue;
            }'''
new_var = '''        for node in sorted_nodes.iter() {
            if node.is_variable() {
                if let Some(grad) = grads.get(node) {
                    on_final(node, grad)?;
                }
                continue;
            }'''
assert old_head in s2 and old_var in s2, "backward() changed upstream"
s2 = s2.replace(old_head, new_head).replace(old_var, new_var)
open(p, 'w').write(s2)
print("replaced", n, "remaining or_insert:", s2.count("grads.or_insert("))
