//! A slab: values in numbered places that are reused once freed, so a
//! number can be a mio token. Connections and backend sockets each have
//! one in every worker.

pub struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// The place the next `insert` will use.
    pub fn vacant(&self) -> usize {
        self.free.last().copied().unwrap_or(self.entries.len())
    }

    /// Put `value` in the place `vacant` gave.
    pub fn insert(&mut self, value: T) -> usize {
        let key = match self.free.pop() {
            Some(key) => key,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        debug_assert!(self.entries[key].is_none());
        self.entries[key] = Some(value);
        self.len += 1;
        key
    }

    pub fn remove(&mut self, key: usize) -> Option<T> {
        let value = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(value)
    }

    pub fn get(&self, key: usize) -> Option<&T> {
        self.entries.get(key)?.as_ref()
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key)?.as_mut()
    }

    /// Values held now.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the highest place ever used: every key is below it.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_reused_and_vacant_says_which() {
        let mut slab = Slab::default();
        assert_eq!(slab.vacant(), 0);
        let a = slab.insert("a");
        let b = slab.insert("b");
        assert_eq!((a, b, slab.len()), (0, 1, 2));
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.remove(a), None, "twice");
        assert_eq!(slab.vacant(), a);
        assert_eq!(slab.insert("c"), a);
        assert_eq!(slab.get(a), Some(&"c"));
        assert_eq!(slab.get(7), None);
        assert_eq!((slab.len(), slab.capacity()), (2, 2));
    }
}
