module regcred.test/testbin/testimage

go 1.24.0
