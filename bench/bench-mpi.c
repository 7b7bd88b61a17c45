/* SPDX-License-Identifier: MIT */
/* Placeholder: the MPI benchmark is written in the next commit. */
int main(void) { return 77; }
