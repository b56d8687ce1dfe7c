//go:build !linux

package main

import "syscall"

// perfSysProcAttr: only Linux can tie a child's life to its parent's.
func perfSysProcAttr() *syscall.SysProcAttr { return nil }
