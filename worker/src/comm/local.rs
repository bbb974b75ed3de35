//! World size 1: every collective is the identity.

use super::{Comm, CommError};

#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Comm for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}
