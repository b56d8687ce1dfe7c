package main

import "syscall"

// perfSysProcAttr makes a server subprocess die with the test binary, so a
// test killed by its timeout leaves no agentline running.
func perfSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
