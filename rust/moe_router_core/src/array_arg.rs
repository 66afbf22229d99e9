//! `ArrayArg`: a caller's array (row-major data plus its shape), so that the
//! core checks shapes and reports them in the caller's terms.

use crate::error::{Result, RouterError};

/// A row-major array handed in by a caller: its elements and its shape.
#[derive(Debug, Clone, Copy)]
pub struct ArrayArg<'a, F> {
    /// Argument name, for error messages (`weight`, `group_weight`, ...).
    pub name: &'static str,
    /// The elements, row-major.
    pub data: &'a [F],
    /// The shape; its product is `data.len()`.
    pub shape: &'a [usize],
}

impl<'a, F> ArrayArg<'a, F> {
    /// Check the shape against `expected` (`None` = any extent), with `what`
    /// explaining the expected shape in the error.
    pub fn check_shape(&self, expected: &[Option<usize>], what: &str) -> Result<&'a [F]> {
        let fits = self.shape.len() == expected.len()
            && self.shape.iter().zip(expected).all(|(&n, want)| want.is_none_or(|w| w == n))
            && self.shape.iter().product::<usize>() == self.data.len();
        if fits {
            Ok(self.data)
        } else {
            Err(RouterError::shape(self.name, what.to_string(), format!("{:?}", self.shape)))
        }
    }
}
