//! The LM head fused with the softmax-KL loss: distilling a language model over its vocabulary
//! without ever holding the `[rows, vocab]` logits of student and teacher whole. Rows go through in
//! chunks: both heads' logits for the chunk, the loss and its logit gradient in place, then the
//! gradient is pushed back through the student's head and the chunk's buffers are dropped. Memory
//! grows with `chunk_rows · vocab`, not with `rows · vocab`. Built from backend ops only, so it runs
//! wherever they do.

use anyhow::{bail, Result};

use super::{Backend, KlTerms, RowLosses, SoftmaxKl, Teacher, Transpose, IGNORE_INDEX};
use crate::tensor::Tensor;

/// A model's last hidden states `[rows, width]` and its output head `[vocab, width]` (no bias, as in
/// Llama-family LM heads).
#[derive(Clone, Copy, Debug)]
pub struct HeadInput<'a> {
    pub hidden: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The softmax-KL loss ([`SoftmaxKl`], with `terms`) between `hidden·weightᵀ` of the student and of
/// the teacher; returns the per-row losses with their mean, and the gradient with respect to the
/// student's hidden states. The gradient with respect to the student's head is accumulated into
/// `d_weight` when given (a frozen head passes `None` and costs nothing there).
pub fn head_kl(
    be: &dyn Backend,
    student: HeadInput,
    teacher: HeadInput,
    terms: &KlTerms,
    chunk_rows: usize,
    mut d_weight: Option<&mut Tensor>,
) -> Result<(RowLosses, Tensor)> {
    let (rows, width) = student.hidden.rows_cols();
    let (vocab, head_width) = student.weight.rows_cols();
    if head_width != width {
        bail!(
            "fused head KL: student hidden width {width} but head {:?}",
            student.weight.shape()
        );
    }
    if teacher.hidden.rows_cols().0 != rows {
        bail!(
            "fused head KL: {rows} student rows but {} teacher rows",
            teacher.hidden.rows_cols().0
        );
    }
    if teacher.weight.rows_cols() != (vocab, teacher.hidden.rows_cols().1) {
        bail!(
            "fused head KL: teacher head {:?} does not map width {} to the student's vocabulary {vocab}",
            teacher.weight.shape(),
            teacher.hidden.rows_cols().1
        );
    }
    if let Some(dw) = d_weight.as_deref() {
        if dw.shape() != student.weight.shape() {
            bail!(
                "fused head KL: head gradient {:?} for a head {:?}",
                dw.shape(),
                student.weight.shape()
            );
        }
    }
    if chunk_rows == 0 {
        bail!("fused head KL: chunk_rows must be at least 1");
    }
    let counted = terms.validate(rows, vocab)?;
    let mut d_hidden = student.hidden.zeros_like();
    let mut per_row = Vec::with_capacity(rows);
    let mut mean = 0.0;
    for start in (0..rows).step_by(chunk_rows) {
        let end = (start + chunk_rows).min(rows);
        let ids: Vec<u32> = (start as u32..end as u32).collect();
        let chunk_terms = terms.rows(start..end);
        let chunk_counted = chunk_terms.labels.map_or(end - start, |l| {
            l.iter().filter(|&&y| y != IGNORE_INDEX).count()
        });
        if chunk_counted == 0 {
            per_row.extend(std::iter::repeat_n(0.0, end - start));
            continue;
        }
        let hidden = be.embedding(student.hidden, &ids)?;
        let mut logits = be.linear(&hidden, student.weight, None)?;
        let teacher_logits =
            be.linear(&be.embedding(teacher.hidden, &ids)?, teacher.weight, None)?;
        let spec = SoftmaxKl {
            teacher: Teacher::Logits(&teacher_logits),
            terms: chunk_terms,
        };
        let part = be.softmax_kl_in_place(&mut logits, &spec)?;
        // The chunk's loss is a mean over its own counted rows: reweight it to the whole batch's.
        let share = chunk_counted as f64 / counted as f64;
        mean += part.mean * share;
        per_row.extend(part.rows);
        be.scale(&mut logits, share as f32)?;
        let mut d_chunk = Tensor::zeros_on(&[end - start, width], hidden.dtype(), hidden.device())?;
        be.matmul(&logits, student.weight, Transpose::NN, &mut d_chunk, false)?;
        be.embedding_backward(&d_chunk, &ids, &mut d_hidden)?;
        if let Some(dw) = d_weight.as_deref_mut() {
            be.matmul(&logits, &hidden, Transpose::TN, dw, true)?;
        }
    }
    Ok((
        RowLosses {
            mean,
            rows: per_row,
        },
        d_hidden,
    ))
}
