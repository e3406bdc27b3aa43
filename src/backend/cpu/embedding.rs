//! Embedding lookup and its backward (scatter-add of output gradients into the table rows).

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::simd::simd;
use super::with_real;
use crate::tensor::Tensor;

fn check_ids(op: &str, ids: &[u32], vocab: usize) -> Result<()> {
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        bail!("{op}: id {id} at position {pos} is out of range for a table of {vocab} rows");
    }
    Ok(())
}

pub fn lookup(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    ensure!(
        table.shape().len() == 2,
        "embedding: table must be 2-D, got {:?}",
        table.shape()
    );
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    check_ids("embedding", ids, vocab)?;
    let mut out = Tensor::zeros(&[ids.len(), dim], table.dtype());
    with_real!(table.dtype(), T => {
        let td = table.data::<T>()?;
        out.data_mut::<T>()?.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
            row.copy_from_slice(&td[id as usize * dim..(id as usize + 1) * dim]);
        });
    });
    Ok(out)
}

/// Rows of `dy` are added to `dtable[ids[i]]` in row order: several rows may share an id, and a fixed
/// order keeps the sums reproducible. This is a small share of a training step (one pass over `dy`).
pub fn scatter_add(dy: &Tensor, ids: &[u32], dtable: &mut Tensor) -> Result<()> {
    let (vocab, dim) = (dtable.shape()[0], dtable.shape()[1]);
    ensure!(
        dy.rows_cols() == (ids.len(), dim),
        "embedding backward: dy is {:?}, expected [{}, {dim}]",
        dy.shape(),
        ids.len()
    );
    check_ids("embedding backward", ids, vocab)?;
    with_real!(dy.dtype(), T => {
        let dyd = dy.data::<T>()?;
        let td = dtable.data_mut::<T>()?;
        simd!({
            for (row, &id) in dyd.chunks_exact(dim).zip(ids) {
                for (t, &g) in td[id as usize * dim..(id as usize + 1) * dim].iter_mut().zip(row) {
                    *t += g;
                }
            }
        });
    });
    Ok(())
}
